"""Split-KV (flash-decoding) paged decode attention, one query token per request, returning the
natural-log LSE that the DCP combine needs. One program per (request, kv head, head block, split)
reads each KV tile once for all its query heads (MLA: all heads share the single latent)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel
from kernels.dot_operands import dot_operands
from kernels.merge_states import merge_states

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # KV tokens per tile
    num_splits: int  # programs per (request, kv head) along the sequence
    num_warps: int
    num_stages: int
    max_block_h: int = 64  # query heads per program (more heads -> more head blocks)


# Contexts up to this many tokens (a host bound on the batch's lengths) take one split of 64-token
# tiles at 8 warps when the batch alone about fills the GPU, which also saves the merge launch.
# Measured on one H200 (batch 128, 16 heads x 576, pages of 16), with the table reads pipelined:
# 23.6 us per layer inside the decode step at ~258 tokens (28.8 with two stages and the table
# read in the loop), before the loop lost its per-token division (26bc05b: 13.7 us for 256 tokens
# outside the step, 18.3 before). Re-tuned in the step after that: (32, 1, 4, 3) 9.04 ms TPOT,
# these tiles 9.05, (64, 1, 4, 3) 9.07, (64, 1, 8, 2) 9.15. The bound could rise: with KV far
# beyond L2 these tiles took 59.8 us at 1024 tokens (two splits: 64.8) and 113.3 at 2048 (109.6),
# before 26bc05b; at 512 the GPU tests cross it within the tiny models' 512 positions.
MAX_SHORT_CONTEXT = 512
# Splits (long contexts, or batches that leave SMs idle) cover at least this many tokens, the rule
# of the 32-token tiles before (small batches were not re-measured with the 64-token tiles).
MIN_SPLIT_TOKENS = 128
SHORT_CONTEXT_CONFIG = DecodeConfig(block_n=64, num_splits=1, num_warps=8, num_stages=3)


def decode_config(num_reqs: int, num_kv_heads: int, max_context: int, device: torch.device,
                  num_splits: int | None = None) -> DecodeConfig:
    """Tiles and splits for a launch; only static sizes (no device sync, safe in CUDA graphs).
    max_context bounds every sequence length (the table's capacity, or a tighter host bound)."""
    if device.type != "cuda":  # the interpreter: ~1 ms per program, so few, small programs
        return DecodeConfig(16, num_splits or min(2, triton.cdiv(max_context, 16)), 1, 1)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return gpu_decode_config(num_reqs * num_kv_heads, max_context, num_sms, num_splits)


def gpu_decode_config(num_programs: int, max_context: int, num_sms: int,
                      num_splits: int | None = None) -> DecodeConfig:
    """The GPU rule: num_programs = requests x kv heads (programs per split)."""
    # Measured on one H200 (bf16, 16 heads x 576, pages of 16, batch 128, table reads pipelined):
    # 64-token tiles, 4 warps, 2 stages, two programs per SM: 3.06 TB/s at 4k, 3.27 at 8k (32-token
    # tiles: 2.44 and 2.55); a partial second wave (e.g. 3 splits at batch 128) cost up to 30%.
    # Since 26bc05b (no per-token division in the loop) the same tiles read 3.81 and 4.05 TB/s;
    # not re-tuned since.
    wanted = 2 * num_sms // max(num_programs, 1)
    if num_splits is None and wanted <= 2 and max_context <= MAX_SHORT_CONTEXT:
        return SHORT_CONTEXT_CONFIG
    if num_splits is None:
        num_splits = max(1, min(wanted, 32, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))
    return DecodeConfig(64, num_splits, 4, 2)


@triton.jit
def _page_numbers(table_row, tile_start, tile_page, end, table_stride_b, BLOCK_SIZE: tl.constexpr,
                  PAGE_ALIGNED: tl.constexpr):
    """[BLOCK_N] int64 page numbers of the tile's tokens (0 past `end`); tile_page is
    offs_n // BLOCK_SIZE if PAGE_ALIGNED, else offs_n."""
    if PAGE_ALIGNED:
        first = tile_start + tile_page * BLOCK_SIZE  # the tile's first token in that page
        page = tile_start // BLOCK_SIZE + tile_page
    else:
        first = tile_start + tile_page
        page = first // BLOCK_SIZE
    return tl.load(table_row + page * table_stride_b, mask=first < end, other=0).to(tl.int64)


@triton.jit
def _load_rows(ptrs, row_mask, col_mask, MASK_COLS: tl.constexpr):
    """A [rows, cols] tile, zero in masked rows (and masked columns if MASK_COLS)."""
    if MASK_COLS:
        return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    return tl.load(ptrs, mask=row_mask[:, None], other=0.0)


@triton.jit
def _attend_tile(q1, q2, m_i, l_i, acc, block, tile_start, end, table_row, tile_page, offs_n,
                 k_ptr, v_ptr, scale_log2, k_stride_b, k_stride_o, k_stride_d,
                 v_stride_b, v_stride_o, v_stride_d, table_stride_b,
                 HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, PAGE_ALIGNED: tl.constexpr, V_FROM_K: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) by the BLOCK_N tokens from tile_start (a
    multiple of BLOCK_N) before `end`, whose page numbers are `block`; returns them and the
    next tile's page numbers. k_ptr / v_ptr point at the kv head. With PAGE_ALIGNED (BLOCK_N and
    the page size divide one another) a token's slot is a per-tile scalar plus a loop-invariant
    vector: no per-token division (1018 -> 569 SASS instructions per 64-token MLA tile; figures
    in docs/BENCHMARKS.md, eleventh session)."""
    tok_mask = tile_start + offs_n < end
    next_block = _page_numbers(table_row, tile_start + BLOCK_N, tile_page, end, table_stride_b,
                               BLOCK_SIZE, PAGE_ALIGNED)
    if PAGE_ALIGNED:
        slots = tile_start % BLOCK_SIZE + offs_n % BLOCK_SIZE
    else:
        slots = (tile_start + offs_n) % BLOCK_SIZE
    k_rows = k_ptr + block * k_stride_b + slots * k_stride_o  # [BLOCK_N]
    d1 = tl.arange(0, BLOCK_D1)
    k1 = _load_rows(k_rows[:, None] + d1[None, :] * k_stride_d, tok_mask, d1 < HEAD_DIM_K,
                    BLOCK_D1 > HEAD_DIM_K).to(DOT_DTYPE)
    scores = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
    if BLOCK_D2 > 0:
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        k2 = _load_rows(k_rows[:, None] + d2[None, :] * k_stride_d, tok_mask, d2 < HEAD_DIM_K,
                        BLOCK_D1 + BLOCK_D2 > HEAD_DIM_K).to(DOT_DTYPE)
        scores += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
    scores = tl.where(tok_mask[None, :], scores * scale_log2, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if V_FROM_K:  # V is a prefix view of K (MLA latent): reuse the loaded tile
        v = k1
    else:
        dv = tl.arange(0, BLOCK_DV)
        v_rows = v_ptr + block * v_stride_b + slots * v_stride_o
        v = _load_rows(v_rows[:, None] + dv[None, :] * v_stride_d, tok_mask, dv < HEAD_DIM_V,
                       BLOCK_DV > HEAD_DIM_V).to(DOT_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc, next_block


@triton.jit
def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        scale_log2, group_size, num_head_blocks, max_context,
        q_stride_r, q_stride_h, q_stride_d,
        k_stride_b, k_stride_o, k_stride_h, k_stride_d,
        v_stride_b, v_stride_o, v_stride_h, v_stride_d,
        table_stride_r, table_stride_b,
        out_stride_s, out_stride_r, out_stride_h, out_stride_d,
        lse_stride_s, lse_stride_r, lse_stride_h,
        HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr,
        BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        PAGE_ALIGNED: tl.constexpr, V_FROM_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // num_head_blocks
    head_in_group = (tl.program_id(1) % num_head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = head_in_group < group_size
    heads = (kv_head * group_size + head_in_group).to(tl.int64)  # [BLOCK_H]
    split = tl.program_id(2)

    seq_len = tl.minimum(tl.load(seq_lens_ptr + req), max_context)
    split_len = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    # Head dims need not be powers of two: K is covered by two power-of-two column tiles
    # (576 = 512 + 64, 80 = 64 + 16), V by one masked tile.
    d1 = tl.arange(0, BLOCK_D1)
    q_rows = q_ptr + req * q_stride_r + heads[:, None] * q_stride_h
    q1 = tl.load(q_rows + d1[None, :] * q_stride_d,
                 mask=head_mask[:, None] & (d1 < HEAD_DIM_K)[None, :], other=0.0).to(DOT_DTYPE)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + d2[None, :] * q_stride_d,
                     mask=head_mask[:, None] & (d2 < HEAD_DIM_K)[None, :], other=0.0).to(DOT_DTYPE)
    else:
        q2 = q1  # unused
    dv = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of log2-scaled scores
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    # Each tile's page numbers are read one iteration ahead (software-pipelined), so that with
    # three pipeline stages Triton issues the table reads as async copies too and a tile's KV copy
    # never waits on a table read: 28.8 -> 23.6 us per layer in the dsv2lite decode step.
    table_row = block_table_ptr + req * table_stride_r
    offs_n = tl.arange(0, BLOCK_N)
    tile_page = offs_n // BLOCK_SIZE if PAGE_ALIGNED else offs_n
    block = _page_numbers(table_row, start, tile_page, end, table_stride_b, BLOCK_SIZE,
                          PAGE_ALIGNED)
    for tile_start in range(start, end, BLOCK_N):
        m_i, l_i, acc, block = _attend_tile(
            q1, q2, m_i, l_i, acc, block, tile_start, end, table_row, tile_page, offs_n,
            k_ptr + kv_head * k_stride_h, v_ptr + kv_head * v_stride_h, scale_log2,
            k_stride_b, k_stride_o, k_stride_d, v_stride_b, v_stride_o, v_stride_d,
            table_stride_b, HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV,
            BLOCK_SIZE, PAGE_ALIGNED, V_FROM_K, DOT_DTYPE, DOT_PRECISION)

    has_keys = l_i > 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    ln2 = 0.6931471805599453
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * ln2, float("-inf"))
    out_rows = out_ptr + split * out_stride_s + req * out_stride_r + heads[:, None] * out_stride_h
    tl.store(out_rows + dv[None, :] * out_stride_d, out.to(out_ptr.dtype.element_ty),
             mask=head_mask[:, None] & (dv < HEAD_DIM_V)[None, :])
    tl.store(lse_ptr + split * lse_stride_s + req * lse_stride_r + heads * lse_stride_h, lse,
             mask=head_mask)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    if (q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or q.shape[2] < 1):
        raise ValueError(f"q must be [R, H, Dk >= 1] float16/bfloat16/float32, got "
                         f"{tuple(q.shape)} {q.dtype}")
    num_reqs, num_heads, head_dim_k = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != head_dim_k or k_cache.dtype != q.dtype:
        raise ValueError(f"k_cache must be [num_blocks, B, Hkv, {head_dim_k}] {q.dtype}, got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    if (v_cache.dim() != 4 or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3])
            or v_cache.shape[3] < 1 or v_cache.dtype != q.dtype):
        raise ValueError(f"v_cache must be [{', '.join(map(str, k_cache.shape[:3]))}, Dv] "
                         f"{q.dtype}, got {tuple(v_cache.shape)} {v_cache.dtype}")
    if k_cache.shape[2] < 1 or num_heads % k_cache.shape[2]:
        raise ValueError(f"q's {num_heads} heads must be a multiple of the cache's "
                         f"{k_cache.shape[2]} kv heads")
    if (block_table.dim() != 2 or block_table.shape[0] != num_reqs
            or block_table.dtype != torch.int32):
        raise ValueError(f"block_table must be [R={num_reqs}, max_num_blocks] int32, got "
                         f"{tuple(block_table.shape)} {block_table.dtype}")
    if tuple(seq_lens.shape) != (num_reqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be [R={num_reqs}] int32, got {tuple(seq_lens.shape)} "
                         f"{seq_lens.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"q, caches, block_table and seq_lens must share a device, got "
                         f"{sorted(map(str, devices))}")


def _k_tiles(head_dim_k: int) -> tuple[int, int]:
    """Two power-of-two column tiles (>= 16 for tl.dot) covering head_dim_k; the second may be 0."""
    first = max(16, 1 << (head_dim_k.bit_length() - 1))
    rest = head_dim_k - first
    return first, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 num_splits: int | None = None, config: DecodeConfig | None = None,
                 max_seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [R, H, Dk] over each request's first seq_lens[r] cached tokens.

    k_cache [num_blocks, B, Hkv, Dk], v_cache [num_blocks, B, Hkv, Dv] (may be a prefix view of
    k_cache), block_table [R, max_num_blocks] int32, seq_lens [R] int32 (capped at the table's
    capacity) -> out [R, H, Dv] in q.dtype, lse [R, H] fp32 natural log (-inf, out 0 if empty).
    Query head h reads kv head h // (H / Hkv). `config` (tiles and splits) defaults to
    decode_config(...), with `num_splits` if given; `max_seq_len`, a host bound on seq_lens
    (e.g. a CUDA graph's length bucket), lets it pick the tiles of short contexts.
    """
    _check_inputs(q, k_cache, v_cache, block_table, seq_lens)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    num_reqs, num_heads, head_dim_k = q.shape
    _, block_size, num_kv_heads, head_dim_v = v_cache.shape
    out = torch.empty(num_reqs, num_heads, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_reqs, num_heads, dtype=torch.float32, device=q.device)
    if not out.numel():
        return out, lse
    max_context = block_table.shape[1] * block_size
    bound = max_context if max_seq_len is None else min(max_seq_len, max_context)
    cfg = config or decode_config(num_reqs, num_kv_heads, bound, q.device, num_splits)
    group_size = num_heads // num_kv_heads
    block_h = min(max(16, triton.next_power_of_2(group_size)), cfg.max_block_h)
    num_head_blocks = triton.cdiv(group_size, block_h)
    block_d1, block_d2 = _k_tiles(head_dim_k)
    v_from_k = (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
                and head_dim_v <= block_d1)
    block_dv = block_d1 if v_from_k else max(16, triton.next_power_of_2(head_dim_v))
    dot_dtype, precision = dot_operands(q.dtype)

    if cfg.num_splits == 1:  # the single split is the result
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.empty(cfg.num_splits, num_reqs, num_heads, head_dim_v,
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty(cfg.num_splits, num_reqs, num_heads, dtype=torch.float32,
                               device=q.device)
    _paged_decode_kernel[(num_reqs, num_kv_heads * num_head_blocks, cfg.num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, part_out, part_lse,
        scale * _LOG2E, group_size, num_head_blocks, max_context, *q.stride(),
        *k_cache.stride(), *v_cache.stride(), *block_table.stride(), *part_out.stride(),
        *part_lse.stride(),
        HEAD_DIM_K=head_dim_k, HEAD_DIM_V=head_dim_v, BLOCK_H=block_h, BLOCK_N=cfg.block_n,
        BLOCK_D1=block_d1, BLOCK_D2=block_d2, BLOCK_DV=block_dv, BLOCK_SIZE=block_size,
        PAGE_ALIGNED=cfg.block_n % block_size == 0 or block_size % cfg.block_n == 0,
        V_FROM_K=v_from_k,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dependent_launch(q.device))
    if cfg.num_splits == 1:
        return out, lse
    return merge_states(part_out, part_lse, out_dtype=q.dtype)


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `paged_decode`: gather each request's tokens and attend in fp32."""
    _check_inputs(q, k_cache, v_cache, block_table, seq_lens)
    num_reqs, num_heads, head_dim_k = q.shape
    _, block_size, num_kv_heads, head_dim_v = v_cache.shape
    lens = seq_lens.long().clamp(max=block_table.shape[1] * block_size)  # [R]
    pos = torch.arange(max(int(lens.max()) if num_reqs else 0, 1), device=q.device)  # [L]
    valid = pos[None, :] < lens[:, None]  # [R, L]
    blocks = torch.where(valid, block_table[:, (pos // block_size).clamp(
        max=block_table.shape[1] - 1)].long(), 0)  # [R, L]
    keep = valid[:, :, None, None]  # slots past a sequence may hold anything, NaN included
    k = torch.where(keep, k_cache[blocks, pos % block_size].float(), 0.0)  # [R, L, Hkv, Dk]
    v = torch.where(keep, v_cache[blocks, pos % block_size].float(), 0.0)  # [R, L, Hkv, Dv]
    q_grouped = q.float().view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim_k)
    scores = torch.einsum("rkgd,rlkd->rkgl", q_grouped, k) * scale  # [R, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [R, Hkv, G]
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
    out = torch.einsum("rkgl,rlkd->rkgd", probs, v)  # [R, Hkv, G, Dv]
    return (out.reshape(num_reqs, num_heads, head_dim_v).to(q.dtype),
            lse.reshape(num_reqs, num_heads))
