"""Triton fused MoE for decode: pairs (token, choice) grouped by expert (kernels/expert_buckets.py),
a grouped GEMM for gate and up (silu(gate) * up), one for down (times the router weight), a
fixed-order sum over choices, to which an optional per-token input (DeepSeek's shared experts'
output) is added, then optionally a residual and an RMSNorm (the next layer's input norm).
Worst-case static buffers: no host sync, CUDA-graph safe."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel
from kernels.dot_operands import DOT_DTYPES, dot_operands, interpreting
from kernels.expert_buckets import ExpertBuckets, bucket_by_expert, bucket_rows, max_row_blocks
from kernels.rms_norm import rms_norm, weighted_rms_norm


@dataclass(frozen=True)
class GemmTiles:
    block_n: int  # output columns per program (gate/up: intermediate columns, each read twice)
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # pair rows per program; each expert's bucket is cut into blocks of it
    gate_up: GemmTiles
    down: GemmTiles


# One H200, E=64, H=2048, I=1408 (TP1) or 704 (TP2), bf16, uniform top-6 routing: (largest
# batch, config), first match wins. Starting points from perf.md section 9 (a plain grouped GEMM
# whose gate/up BLOCK_N spanned 2I rows: halved here, where one program reads gate and up);
# refine with `python benchmarks/moe_bench.py --tune` and paste its output here.
_H200_CONFIGS = (
    (1, MoeConfig(16, GemmTiles(32, 256, 4, 3), GemmTiles(32, 256, 4, 3))),
    (8, MoeConfig(16, GemmTiles(32, 256, 4, 3), GemmTiles(64, 256, 4, 3))),
    (32, MoeConfig(16, GemmTiles(32, 128, 4, 4), GemmTiles(64, 128, 4, 4))),
    (64, MoeConfig(16, GemmTiles(64, 128, 4, 4), GemmTiles(64, 128, 4, 4))),
    (128, MoeConfig(16, GemmTiles(128, 128, 4, 3), GemmTiles(128, 128, 4, 3))),
    (256, MoeConfig(32, GemmTiles(128, 64, 4, 4), GemmTiles(256, 64, 4, 4))),
)
_LARGE_BATCH_CONFIG = MoeConfig(64, GemmTiles(128, 64, 8, 4), GemmTiles(128, 64, 8, 4))
_INTERPRETER_CONFIG = MoeConfig(16, GemmTiles(64, 64, 1, 1), GemmTiles(64, 64, 1, 1))


def moe_config(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int,
               dtype: torch.dtype) -> MoeConfig:
    """Tiles for a launch, from static sizes only. Under TRITON_INTERPRET one small config (the
    interpreter costs ~1 ms per program). fp32 halves BLOCK_K: the same shared memory per stage."""
    if interpreting():
        return _INTERPRETER_CONFIG
    config = next((cfg for max_tokens, cfg in _H200_CONFIGS if num_tokens <= max_tokens),
                  _LARGE_BATCH_CONFIG)
    # gate/up tiles cover I in whole: at I=704 (TP2) BLOCK_N 128 leaves a half-empty last
    # column tile and half the programs; the step profiles measured gate/up at 4.1 TB/s with
    # BLOCK_N 64 (batch 64) against 3.6 TB/s with 128 (batch 128). Not yet re-tuned at 704.
    gate_up = config.gate_up
    while gate_up.block_n > 16 and intermediate_size % gate_up.block_n:
        gate_up = replace(gate_up, block_n=gate_up.block_n // 2)
    config = replace(config, gate_up=gate_up)
    if dtype == torch.float32:
        config = MoeConfig(config.block_m, *(
            replace(t, block_k=max(32, t.block_k // 2)) for t in (config.gate_up, config.down)))
    return config


@triton.jit(do_not_specialize=["num_pairs"])  # one compile for every batch size
def _gate_up_kernel(x_ptr, w13_ptr, act_ptr, counts_ptr, buckets_ptr,
                    num_pairs, num_experts, top_k, hidden_size, intermediate_size,
                    x_stride_t, x_stride_h, w_stride_e, w_stride_n, w_stride_k, act_stride_r,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """act[rows, cols] = silu(x_t @ gate_e.T) * (x_t @ up_e.T) for one block of pair rows."""
    wait_for_previous_kernel(PDL)
    num_col_tiles = tl.cdiv(intermediate_size, BLOCK_N)
    block, col_tile = tl.program_id(0) // num_col_tiles, tl.program_id(0) % num_col_tiles
    expert, pairs, row_mask = bucket_rows(block, counts_ptr, buckets_ptr, num_experts,
                                          num_pairs, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = (pairs // top_k).to(tl.int64)  # padding rows load zeros
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < intermediate_size
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_stride_t + ks[None, :] * x_stride_h  # [BM, BK]
    gate_ptrs = (w13_ptr + expert.to(tl.int64) * w_stride_e + cols[None, :] * w_stride_n
                 + ks[:, None] * w_stride_k)  # [BK, BN]
    up_ptrs = gate_ptrs + intermediate_size * w_stride_n
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        k_mask = ks < hidden_size - k_start
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            gate = tl.load(gate_ptrs, mask=col_mask[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gate = tl.load(gate_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            up = tl.load(up_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        x = x.to(DOT_DTYPE)
        acc_gate = tl.dot(x, gate.to(DOT_DTYPE), acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up.to(DOT_DTYPE), acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * x_stride_h
        gate_ptrs += BLOCK_K * w_stride_k
        up_ptrs += BLOCK_K * w_stride_k
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    act_ptrs = act_ptr + rows[:, None].to(tl.int64) * act_stride_r + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_mask[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(act_ptr, w2_ptr, pair_out_ptr, counts_ptr, buckets_ptr, weights_ptr,
                 num_pairs, num_experts, hidden_size, intermediate_size,
                 act_stride_r, w_stride_e, w_stride_n, w_stride_k, out_stride_p,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """pair_out[pair, cols] = weight[pair] * (act[row] @ down_e.T) for one block of pair rows,
    in fp32, stored in pair_out's dtype."""
    wait_for_previous_kernel(PDL)
    num_col_tiles = tl.cdiv(hidden_size, BLOCK_N)
    block, col_tile = tl.program_id(0) // num_col_tiles, tl.program_id(0) % num_col_tiles
    expert, pairs, row_mask = bucket_rows(block, counts_ptr, buckets_ptr, num_experts,
                                          num_pairs, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    act_ptrs = act_ptr + rows[:, None].to(tl.int64) * act_stride_r + ks[None, :]  # [BM, BK]
    w_ptrs = (w2_ptr + expert.to(tl.int64) * w_stride_e + cols[None, :] * w_stride_n
              + ks[:, None] * w_stride_k)  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, intermediate_size, BLOCK_K):
        if EVEN_K:
            act = tl.load(act_ptrs)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < intermediate_size - k_start
            act = tl.load(act_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(act.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        act_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * w_stride_k
    weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
    out_ptrs = pair_out_ptr + pairs[:, None].to(tl.int64) * out_stride_p + cols[None, :]
    tl.store(out_ptrs, (acc * weight[:, None]).to(pair_out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _sum_choices_kernel(pair_out_ptr, ids_ptr, add_ptr, residual_ptr, norm_weight_ptr, out_ptr,
                        sum_ptr, num_experts, hidden_size, eps, out_stride_p, add_stride_t,
                        residual_stride_t, out_stride_t, TOP_K: tl.constexpr,
                        HAS_ADD: tl.constexpr, ALL_LOCAL: tl.constexpr, NORM: tl.constexpr,
                        BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """out[t] = (add[t] if HAS_ADD) + sum over k in order of pair_out[t*K + k], skipping pairs
    with no local expert (unless ALL_LOCAL: no ids are read); in fp32. The unrolled k loop issues
    its K independent loads at once.
    NORM (one program per token): then sum[t] = out[t] + residual[t] and out[t] = its RMSNorm
    times norm_weight, rounded as kernels/rms_norm.py rounds them (sum laid out as out)."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden_size
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_ADD:
        acc += tl.load(add_ptr + token * add_stride_t + cols, mask=col_mask,
                       other=0.0).to(tl.float32)
    for k in tl.static_range(TOP_K):
        pair = token * TOP_K + k
        mask = col_mask
        if not ALL_LOCAL:
            expert = tl.load(ids_ptr + pair)
            mask = mask & (expert >= 0) & (expert < num_experts)
        acc += tl.load(pair_out_ptr + pair * out_stride_p + cols, mask=mask,
                       other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if NORM:
        residual = tl.load(residual_ptr + token * residual_stride_t + cols, mask=col_mask,
                           other=0.0)
        summed = (out.to(tl.float32) + residual.to(tl.float32)).to(out.dtype)
        tl.store(sum_ptr + token * out_stride_t + cols, summed, mask=col_mask)
        out = weighted_rms_norm(summed, norm_weight_ptr, cols, col_mask, hidden_size,
                                eps).to(out.dtype)
    tl.store(out_ptr + token * out_stride_t + cols, out, mask=col_mask)


def _check_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, add: torch.Tensor | None,
                  residual: torch.Tensor | None, norm: tuple[torch.Tensor, float] | None) -> None:
    if x.dim() != 2 or x.dtype not in DOT_DTYPES:
        raise ValueError(f"x must be [T, H] bfloat16, float16 or float32, got {tuple(x.shape)} "
                         f"{x.dtype}")
    num_tokens, hidden_size = x.shape
    if (w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != hidden_size
            or w13.dtype != x.dtype):
        raise ValueError(f"w13 must be [E, 2*I, H={hidden_size}] {x.dtype}, got "
                         f"{tuple(w13.shape)} {w13.dtype}")
    num_experts, intermediate_size = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden_size, intermediate_size) or w2.dtype != x.dtype:
        raise ValueError(f"w2 must be [{num_experts}, {hidden_size}, {intermediate_size}] "
                         f"{x.dtype}, got {tuple(w2.shape)} {w2.dtype}")
    if (topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens
            or topk_ids.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"topk_ids must be [T={num_tokens}, K] int32 or int64, got "
                         f"{tuple(topk_ids.shape)} {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be {list(topk_ids.shape)} floating point, got "
                         f"{tuple(topk_weights.shape)} {topk_weights.dtype}")
    if any(t.device != x.device for t in (w13, w2, topk_ids, topk_weights)):
        raise ValueError(f"w13, w2, topk_ids and topk_weights must be on x's device {x.device}")
    for name, t in (("add", add), ("residual", residual)):
        if t is not None and (t.shape != x.shape or t.stride(-1) != 1 or t.device != x.device):
            raise ValueError(f"{name} must be [T={num_tokens}, H={hidden_size}] with unit column "
                             f"stride on {x.device}, got {tuple(t.shape)} on {t.device}")
    if (residual is None) != (norm is None) or norm is not None and (
            norm[0].shape != (hidden_size,) or norm[0].device != x.device):
        raise ValueError(f"residual and norm = (weight [H={hidden_size}] on {x.device}, eps) go "
                         f"together; got residual {residual is not None}, norm "
                         f"{None if norm is None else tuple(norm[0].shape)}")


def _wait(event: torch.cuda.Event | None, device: torch.device) -> None:
    """Order the device's current stream's next work after `event` (no host wait)."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     config: MoeConfig | None = None,
                     add: torch.Tensor | None = None,
                     add_ready: torch.cuda.Event | None = None,
                     buckets: ExpertBuckets | None = None,
                     residual: torch.Tensor | None = None,
                     norm: tuple[torch.Tensor, float] | None = None,
                     all_local: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """add[t] + sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with
    e = topk_ids[t, k].

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_ids [T, K] (ids
    outside [0, E), e.g. -1 for an expert held elsewhere, contribute nothing); topk_weights
    [T, K]; add [T, H] or None. Returns [T, H] in x's dtype, accumulated in fp32. config
    defaults to moe_config(...). add_ready: an event recorded once `add` is written on another
    stream; only the final sum waits for it, so that work overlaps the expert GEMMs. buckets:
    the pairs already grouped by expert (moe_route fills them), else bucket_by_expert(...).
    residual [T, H] and norm (weight [H], eps): returns (rms_norm(out + residual) * weight,
    out + residual) as kernels/rms_norm.py would, from the same kernel as the sum. all_local:
    the caller vouches that every id lies in [0, E) (the router's, every expert on this rank),
    so the final sum need not read them.
    """
    _check_inputs(x, w13, w2, topk_ids, topk_weights, add, residual, norm)
    num_tokens, hidden_size = x.shape
    num_experts, intermediate_size = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    out = torch.empty(num_tokens, hidden_size, dtype=x.dtype, device=x.device)
    if out.numel() == 0 or top_k == 0:
        _wait(add_ready, x.device)
        out = out.zero_() if add is None else out.copy_(add)
        return out if norm is None else rms_norm(out, norm[0], norm[1], residual)
    cfg = config or moe_config(num_tokens, num_experts, hidden_size, intermediate_size, x.dtype)
    block_m = cfg.block_m
    flat_ids = topk_ids.reshape(-1).contiguous()  # [P], pair p = (token p // K, choice p % K)
    num_pairs = flat_ids.numel()
    if buckets is None:
        buckets = bucket_by_expert(flat_ids, num_experts)
    buckets.check(num_experts, num_pairs, x.device)
    max_blocks = max_row_blocks(num_pairs, num_experts, block_m)
    block_e = triton.next_power_of_2(num_experts)
    act = torch.empty(max_blocks * block_m, intermediate_size, dtype=x.dtype,
                      device=x.device)  # [R, I]
    # Each pair's weighted output is stored in x's dtype (as transformers rounds each expert's
    # output) and summed in fp32: bf16 halves the bytes written and read back, TPOT 9.35 -> 9.29
    # ms against fp32 pair outputs (one H200, dsv2lite, seed workload)
    pair_out = torch.empty(num_pairs, hidden_size, dtype=x.dtype, device=x.device)  # [P, H]
    flat_weights = topk_weights.reshape(-1).contiguous()  # [P]
    dot_dtype, precision = dot_operands(x.dtype)
    pdl = dependent_launch(x.device)
    # One program per (block, column tile), a block's tiles adjacent: the used blocks come first
    # (expert_buckets), so the programs of unused blocks (up to a third at batch 128), which
    # only read the counts and exit, queue behind all the real work instead of between it.
    tiles = cfg.gate_up
    _gate_up_kernel[(max_blocks * triton.cdiv(intermediate_size, tiles.block_n),)](
        x, w13, act, buckets.counts, buckets.pairs, num_pairs, num_experts, top_k,
        hidden_size, intermediate_size, *x.stride(), *w13.stride(), act.stride(0),
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        EVEN_K=hidden_size % tiles.block_k == 0, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl)
    tiles = cfg.down
    _down_kernel[(max_blocks * triton.cdiv(hidden_size, tiles.block_n),)](
        act, w2, pair_out, buckets.counts, buckets.pairs, flat_weights,
        num_pairs, num_experts, hidden_size, intermediate_size, act.stride(0), *w2.stride(),
        pair_out.stride(0), BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, EVEN_K=intermediate_size % tiles.block_k == 0,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **pdl)
    # 256 columns per program: at batch 128, 1024 programs; TPOT 9.44 -> 9.42 ms against 1024
    # columns (one H200, dsv2lite; -0.01 ms in an earlier call). The norm needs whole rows.
    block_h = triton.next_power_of_2(hidden_size)
    if norm is None:
        block_h = min(block_h, 256)
    summed = None if norm is None else torch.empty_like(out)  # [T, H]
    _wait(add_ready, x.device)
    _sum_choices_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        pair_out, flat_ids, pair_out if add is None else add,
        out if residual is None else residual, out if norm is None else norm[0], out,
        out if summed is None else summed, num_experts, hidden_size,
        0.0 if norm is None else norm[1], pair_out.stride(0),
        0 if add is None else add.stride(0), 0 if residual is None else residual.stride(0),
        out.stride(0), TOP_K=top_k, HAS_ADD=add is not None,
        ALL_LOCAL=all_local, NORM=norm is not None, BLOCK_H=block_h,
        num_warps=4 if block_h <= 4096 else 8, **pdl)
    return out if norm is None else (out, summed)
