"""Triton fused MoE for decode: pairs (token, choice) sorted by expert into BLOCK_M-padded segments,
a grouped GEMM for gate and up (silu(gate) * up), one for down (times the router weight), a
fixed-order sum over choices. Optional shared experts (one dense MLP that every token takes) run
through the same two GEMM kernels in dense mode (rows = tokens, larger row tiles, each weight
read once) and join the sum. Worst-case static buffers: no host sync, CUDA-graph safe."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True)
class GemmTiles:
    block_n: int  # output columns per program (gate/up: intermediate columns, each read twice)
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # pair rows per program; each expert's segment is padded to a multiple of it
    gate_up: GemmTiles
    down: GemmTiles
    shared_block_m: int = 16  # token rows per program of the shared experts' dense GEMMs
    shared_gate_up: GemmTiles = GemmTiles(32, 128, 4, 3)
    shared_down: GemmTiles = GemmTiles(32, 128, 4, 3)


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
_INTERPRETER_CONFIG = MoeConfig(16, GemmTiles(64, 64, 1, 1), GemmTiles(64, 64, 1, 1), 16,
                                GemmTiles(32, 32, 1, 1), GemmTiles(32, 32, 1, 1))
# Shared experts: a dense GEMM over all tokens; narrow column tiles keep >= 128 programs at
# DeepSeek-V2-Lite's widths (2816 / 1408 per rank), rows up to 64 per program (one weight read
# for up to 64 tokens). Not swept yet.
MAX_SHARED_BLOCK_M = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def moe_config(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int,
               dtype: torch.dtype) -> MoeConfig:
    """Tiles for a launch, from static sizes only. Under TRITON_INTERPRET one small config (the
    interpreter costs ~1 ms per program). fp32 halves BLOCK_K: the same shared memory per stage."""
    if _interpreting():
        return _INTERPRETER_CONFIG
    config = next((cfg for max_tokens, cfg in _H200_CONFIGS if num_tokens <= max_tokens),
                  _LARGE_BATCH_CONFIG)
    # gate/up tiles cover I in whole: at I=704 (TP2) BLOCK_N 128 leaves a half-empty last
    # column tile and half the programs; the step profiles measured gate/up at 4.1 TB/s with
    # BLOCK_N 64 (batch 64) against 3.6 TB/s with 128 (batch 128). Not yet re-tuned at 704.
    gate_up = config.gate_up
    while gate_up.block_n > 16 and intermediate_size % gate_up.block_n:
        gate_up = replace(gate_up, block_n=gate_up.block_n // 2)
    shared_block_m = min(MAX_SHARED_BLOCK_M, max(16, triton.next_power_of_2(num_tokens)))
    config = replace(config, gate_up=gate_up, shared_block_m=shared_block_m)
    if dtype == torch.float32:
        half_k = [GemmTiles(t.block_n, max(32, t.block_k // 2), t.num_warps, t.num_stages)
                  for t in (config.gate_up, config.down, config.shared_gate_up,
                            config.shared_down)]
        config = replace(config, gate_up=half_k[0], down=half_k[1], shared_gate_up=half_k[2],
                         shared_down=half_k[3])
    return config


@triton.jit
def _align_kernel(ids_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs, num_experts,
                  max_blocks, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Program e: writes expert e's pairs (in pair order) and padding (num_pairs) into its
    segment of sorted_pairs, e into block_experts for its blocks, and -1 into every
    num_experts-th chunk of the unused blocks."""
    expert = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pairs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts)
        counts += tl.sum(hit.to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BLOCK_E]
    ends = tl.cumsum(padded, axis=0)
    own = experts == expert
    seg_end = tl.sum(tl.where(own, ends, 0), axis=0)
    seg_start = seg_end - tl.sum(tl.where(own, padded, 0), axis=0)
    seg_count = tl.sum(tl.where(own, counts, 0), axis=0)

    num_before = tl.zeros([], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pairs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        hit = (ids == expert).to(tl.int32)
        rank = num_before + tl.cumsum(hit, axis=0) - hit  # [CHUNK]
        tl.store(sorted_pairs_ptr + seg_start + rank, pairs, mask=hit > 0)
        num_before += tl.sum(hit, axis=0)
    pad_rows = seg_start + seg_count + tl.arange(0, BLOCK_M)
    tl.store(sorted_pairs_ptr + pad_rows, num_pairs, mask=pad_rows < seg_end)

    for first in range(seg_start // BLOCK_M, seg_end // BLOCK_M, CHUNK):
        blocks = first + tl.arange(0, CHUNK)
        tl.store(block_experts_ptr + blocks, expert, mask=blocks < seg_end // BLOCK_M)
    used_blocks = tl.sum(padded, axis=0) // BLOCK_M
    for first in range(used_blocks + expert * CHUNK, max_blocks, num_experts * CHUNK):
        blocks = first + tl.arange(0, CHUNK)
        tl.store(block_experts_ptr + blocks, -1, mask=blocks < max_blocks)


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, act_ptr, sorted_pairs_ptr, block_experts_ptr,
                    num_pairs, top_k, hidden_size, intermediate_size,
                    x_stride_t, x_stride_h, w_stride_e, w_stride_n, w_stride_k, act_stride_r,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    DENSE: tl.constexpr):
    """act[rows, cols] = silu(x_t @ gate_e.T) * (x_t @ up_e.T) for one block of pair rows.
    DENSE: one expert (0) for every token, row r = token r, num_pairs = the number of tokens."""
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if DENSE:
        expert = tl.zeros([], dtype=tl.int32)
        pairs = rows
    else:
        expert = tl.load(block_experts_ptr + block)
        if expert < 0:
            return
        pairs = tl.load(sorted_pairs_ptr + rows)
    row_mask = pairs < num_pairs  # padding rows load zeros
    tokens = (pairs // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit
def _down_kernel(act_ptr, w2_ptr, pair_out_ptr, sorted_pairs_ptr, block_experts_ptr,
                 weights_ptr, num_pairs, hidden_size, intermediate_size,
                 act_stride_r, w_stride_e, w_stride_n, w_stride_k, out_stride_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 DENSE: tl.constexpr):
    """pair_out[pair, cols] = weight[pair] * (act[row] @ down_e.T) for one block of pair rows.
    DENSE: one expert (0) for every token, row r = pair r = token r, weight 1."""
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if DENSE:
        expert = tl.zeros([], dtype=tl.int32)
        pairs = rows
    else:
        expert = tl.load(block_experts_ptr + block)
        if expert < 0:
            return
        pairs = tl.load(sorted_pairs_ptr + rows)
    row_mask = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    if not DENSE:
        weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
        acc = acc * weight[:, None]
    out_ptrs = pair_out_ptr + pairs[:, None].to(tl.int64) * out_stride_p + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _sum_choices_kernel(pair_out_ptr, ids_ptr, shared_out_ptr, out_ptr, top_k, num_experts,
                        hidden_size, out_stride_p, shared_stride_t, out_stride_t,
                        HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = (shared_out[t] if HAS_SHARED) + sum over k in order of pair_out[t*K + k],
    skipping pairs with no local expert."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden_size
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_out_ptr + token.to(tl.int64) * shared_stride_t + cols,
                       mask=col_mask, other=0.0)
    for k in range(0, top_k):
        pair = token * top_k + k
        expert = tl.load(ids_ptr + pair)
        local = (expert >= 0) & (expert < num_experts)
        acc += tl.load(pair_out_ptr + pair.to(tl.int64) * out_stride_p + cols,
                       mask=col_mask & local, other=0.0)
    tl.store(out_ptr + token.to(tl.int64) * out_stride_t + cols,
             acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def _check_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _DOT_DTYPES:
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


def align_pairs(flat_ids: torch.Tensor, num_experts: int,
                block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat_ids [P] contiguous (pair p: token p // K, choice p % K) -> (sorted_pairs [R] int32:
    the pairs grouped by expert in pair order, each expert's segment padded with P to a multiple
    of block_m; block_experts [R / block_m] int32: each block's expert, -1 if unused). R is the
    worst case over routings, so no host sync is needed. Ids outside [0, E) are dropped."""
    num_pairs = flat_ids.numel()
    # Every expert's segment is padded by < block_m rows, and at most min(E, P) are non-empty.
    max_blocks = (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=flat_ids.device)
    block_experts = torch.empty(max_blocks, dtype=torch.int32, device=flat_ids.device)
    _align_kernel[(num_experts,)](
        flat_ids, sorted_pairs, block_experts, num_pairs, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts),
        CHUNK=min(256, max(16, triton.next_power_of_2(num_pairs))))
    return sorted_pairs, block_experts


def _check_shared(x: torch.Tensor, shared_w13: torch.Tensor | None,
                  shared_w2: torch.Tensor | None) -> None:
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13 and shared_w2 must be given together")
    if shared_w13 is None:
        return
    hidden_size = x.shape[1]
    if (shared_w13.dim() != 2 or shared_w13.shape[0] % 2 or shared_w13.shape[1] != hidden_size
            or shared_w13.dtype != x.dtype or shared_w13.device != x.device):
        raise ValueError(f"shared_w13 must be [2*Is, H={hidden_size}] {x.dtype} on {x.device}, "
                         f"got {tuple(shared_w13.shape)} {shared_w13.dtype}")
    shared_size = shared_w13.shape[0] // 2
    if (tuple(shared_w2.shape) != (hidden_size, shared_size) or shared_w2.dtype != x.dtype
            or shared_w2.device != x.device):
        raise ValueError(f"shared_w2 must be [{hidden_size}, {shared_size}] {x.dtype} on "
                         f"{x.device}, got {tuple(shared_w2.shape)} {shared_w2.dtype}")


def _expert_gemms(x, w13, w2, act, pair_out, sorted_pairs, block_experts, weights, num_pairs,
                  top_k, num_blocks, block_m, gate_up: GemmTiles, down: GemmTiles,
                  dense: bool) -> None:
    """The gate/up and down launches over num_blocks row blocks (dense: rows = tokens of the
    one expert in w13 [1, 2I, H], w2 [1, H, I])."""
    hidden_size, intermediate_size = x.shape[1], w13.shape[1] // 2
    # The interpreter computes bf16/fp16 dots wrongly: operands are upcast there. On the GPU
    # 16-bit operands stay as they are (exact products, fp32 accumulation); fp32 uses IEEE dots.
    upcast = x.dtype == torch.float32 or _interpreting()
    dot_dtype = tl.float32 if upcast else _DOT_DTYPES[x.dtype]
    precision = "ieee" if upcast else "tf32"
    _gate_up_kernel[(num_blocks, triton.cdiv(intermediate_size, gate_up.block_n))](
        x, w13, act, sorted_pairs, block_experts, num_pairs, top_k, hidden_size,
        intermediate_size, *x.stride(), *w13.stride(), act.stride(0),
        BLOCK_M=block_m, BLOCK_N=gate_up.block_n, BLOCK_K=gate_up.block_k,
        EVEN_K=hidden_size % gate_up.block_k == 0, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        DENSE=dense, num_warps=gate_up.num_warps, num_stages=gate_up.num_stages)
    _down_kernel[(num_blocks, triton.cdiv(hidden_size, down.block_n))](
        act, w2, pair_out, sorted_pairs, block_experts, weights, num_pairs, hidden_size,
        intermediate_size, act.stride(0), *w2.stride(), pair_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=down.block_n, BLOCK_K=down.block_k,
        EVEN_K=intermediate_size % down.block_k == 0, DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision, DENSE=dense, num_warps=down.num_warps,
        num_stages=down.num_stages)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     config: MoeConfig | None = None, shared_w13: torch.Tensor | None = None,
                     shared_w2: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k],
    plus shared_down(silu(shared_gate(x_t)) * shared_up(x_t)) when shared weights are given.

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_ids [T, K] (ids
    outside [0, E), e.g. -1 for an expert held elsewhere, contribute nothing); topk_weights
    [T, K]; shared_w13 [2Is, H], shared_w2 [H, Is]. Returns [T, H] in x's dtype, accumulated in
    fp32. config defaults to moe_config(...).
    """
    _check_inputs(x, w13, w2, topk_ids, topk_weights)
    _check_shared(x, shared_w13, shared_w2)
    num_tokens, hidden_size = x.shape
    num_experts, intermediate_size = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    has_shared = shared_w13 is not None
    out = torch.empty(num_tokens, hidden_size, dtype=x.dtype, device=x.device)
    if out.numel() == 0 or (top_k == 0 and not has_shared):
        return out.zero_()
    cfg = config or moe_config(num_tokens, num_experts, hidden_size, intermediate_size, x.dtype)
    flat_ids = topk_ids.reshape(-1).contiguous()  # [P], pair p = (token p // K, choice p % K)
    num_pairs = flat_ids.numel()
    pair_out = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=x.device)  # [P, H]
    if num_pairs:
        sorted_pairs, block_experts = align_pairs(flat_ids, num_experts, cfg.block_m)
        max_blocks = block_experts.numel()
        act = torch.empty(max_blocks * cfg.block_m, intermediate_size, dtype=x.dtype,
                          device=x.device)  # [R, I]
        _expert_gemms(x, w13, w2, act, pair_out, sorted_pairs, block_experts,
                      topk_weights.reshape(-1).contiguous(), num_pairs, top_k, max_blocks,
                      cfg.block_m, cfg.gate_up, cfg.down, dense=False)
    shared_out = pair_out  # a placeholder pointer when there are no shared experts
    if has_shared:
        num_blocks = triton.cdiv(num_tokens, cfg.shared_block_m)
        shared_act = torch.empty(num_blocks * cfg.shared_block_m, shared_w2.shape[1],
                                 dtype=x.dtype, device=x.device)  # [T padded, Is]
        shared_out = torch.empty(num_tokens, hidden_size, dtype=torch.float32,
                                 device=x.device)  # [T, H]
        _expert_gemms(x, shared_w13[None], shared_w2[None], shared_act, shared_out, flat_ids,
                      flat_ids, flat_ids, num_tokens, 1, num_blocks, cfg.shared_block_m,
                      cfg.shared_gate_up, cfg.shared_down, dense=True)
    block_h = min(triton.next_power_of_2(hidden_size), 1024)
    _sum_choices_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        pair_out, flat_ids, shared_out, out, top_k, num_experts, hidden_size,
        pair_out.stride(0), shared_out.stride(0), out.stride(0), HAS_SHARED=has_shared,
        BLOCK_H=block_h)
    return out
