"""Exact combine of partial attention states (out_n, lse_n) computed over disjoint key sets: the
DCP combine across ranks and the split-KV second stage. Empty parts (lse -inf, NaN or +inf) count
as nothing; a row with no keys at all gives out 0 and lse -inf, never NaN."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_D = 1024  # head-dim elements per loop step


@triton.jit
def _merged_lse(lses_ptr, row_offset, lse_stride_n, num_states, BLOCK_N: tl.constexpr):
    """Per-part lse [BLOCK_N] (empty and padding parts -inf), their logsumexp (-inf if all are
    empty) and the shift to weigh parts by, exp(lse_n - shift) (the lse, or 0 if it is -inf).

    lse = m + log(sum_n exp(lse_n - m)) with m = max_n lse_n, so nothing overflows.
    """
    n = tl.arange(0, BLOCK_N)
    lse_n = tl.load(lses_ptr + row_offset + n.to(tl.int64) * lse_stride_n, mask=n < num_states,
                    other=float("-inf"))
    lse_n = tl.where((lse_n != lse_n) | (lse_n == float("inf")), float("-inf"), lse_n)
    lse_max = tl.max(lse_n, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp(lse_n - lse_max), axis=0)
    shift = lse_max + tl.log(tl.where(total > 0, total, 1.0))
    return lse_n, tl.where(total > 0, shift, float("-inf")), shift


@triton.jit
def _merge_states_kernel(outs_ptr, lses_ptr, out_ptr, merged_lse_ptr, num_states, num_heads,
                         outs_stride_n, outs_stride_t, outs_stride_h, outs_stride_d,
                         lse_stride_n, lse_stride_t, lse_stride_h,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    token = (row // num_heads).to(tl.int64)
    head = (row % num_heads).to(tl.int64)
    lse_n, lse, shift = _merged_lse(lses_ptr, token * lse_stride_t + head * lse_stride_h,
                                    lse_stride_n, num_states, BLOCK_N)
    weight = tl.exp(lse_n - shift)  # [BLOCK_N]; 0 for empty parts
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    src = outs_ptr + token * outs_stride_t + head * outs_stride_h + n[:, None] * outs_stride_n
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        # Parts with weight 0 are not read, so NaN in an empty part's output cannot leak in.
        part = tl.load(src + d[None, :] * outs_stride_d,
                       mask=(weight > 0)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        merged = tl.sum(weight[:, None] * part, axis=0)  # [BLOCK_D]
        tl.store(out_ptr + row.to(tl.int64) * HEAD_DIM + d,
                 merged.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(merged_lse_ptr + row, lse)


@triton.jit
def _scale_own_kernel(out_ptr, lses_ptr, scaled_ptr, merged_lse_ptr, own_rank, num_states,
                      num_heads, out_stride_t, out_stride_h, out_stride_d,
                      lse_stride_n, lse_stride_t, lse_stride_h,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    token = (row // num_heads).to(tl.int64)
    head = (row % num_heads).to(tl.int64)
    lse_n, lse, shift = _merged_lse(lses_ptr, token * lse_stride_t + head * lse_stride_h,
                                    lse_stride_n, num_states, BLOCK_N)
    own_lse = tl.max(tl.where(tl.arange(0, BLOCK_N) == own_rank, lse_n, float("-inf")), axis=0)
    factor = tl.exp(own_lse - shift)  # 0 when this rank's part is empty
    src = out_ptr + token * out_stride_t + head * out_stride_h
    read_dim = tl.where(factor > 0, HEAD_DIM, 0)  # nothing is read when the factor is 0
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        own = tl.load(src + d * out_stride_d, mask=d < read_dim, other=0.0)
        tl.store(scaled_ptr + row.to(tl.int64) * HEAD_DIM + d,
                 (own.to(tl.float32) * factor).to(scaled_ptr.dtype.element_ty), mask=d_mask)
    tl.store(merged_lse_ptr + row, lse)


def _block_sizes(num_states: int, head_dim: int) -> tuple[int, int]:
    return triton.next_power_of_2(num_states), min(triton.next_power_of_2(head_dim), _MAX_BLOCK_D)


def _check_lses(lses: torch.Tensor, expected: tuple, device: torch.device) -> None:
    if lses.dtype != torch.float32 or tuple(lses.shape) != expected:
        raise ValueError(f"lses must be {list(expected)} float32 (states, tokens, heads), got "
                         f"{tuple(lses.shape)} {lses.dtype}")
    if lses.device != device:
        raise ValueError(f"lses must be on the outputs' device {device}, got {lses.device}")


def _check_states(outs: torch.Tensor, lses: torch.Tensor) -> None:
    if (outs.dim() != 4 or not outs.dtype.is_floating_point or outs.shape[0] < 1
            or outs.shape[3] < 1):
        raise ValueError(f"outs must be [N >= 1, T, H, D >= 1] floating point, got "
                         f"{tuple(outs.shape)} {outs.dtype}")
    _check_lses(lses, tuple(outs.shape[:3]), outs.device)


def _check_own(out: torch.Tensor, lses: torch.Tensor, own_rank: int) -> None:
    if out.dim() != 3 or not out.dtype.is_floating_point or out.shape[2] < 1:
        raise ValueError(f"out must be [T, H, D >= 1] floating point, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if lses.dim() != 3:
        raise ValueError(f"lses must be [N, T, H] float32, got {tuple(lses.shape)}")
    _check_lses(lses, (lses.shape[0], *out.shape[:2]), out.device)
    if not 0 <= own_rank < lses.shape[0]:
        raise ValueError(f"own_rank must be in [0, {lses.shape[0]}), got {own_rank}")


def merge_states(outs: torch.Tensor, lses: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine N partial states: outs [N, T, H, D], lses [N, T, H] fp32 natural log ->
    (out [T, H, D] in out_dtype (default outs.dtype), lse [T, H] fp32).

    lse = logsumexp_n lse_n and out = sum_n exp(lse_n - lse) * out_n, in fp32.
    """
    _check_states(outs, lses)
    num_states, num_tokens, num_heads, head_dim = outs.shape
    out = torch.empty(outs.shape[1:], dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=outs.device)
    if out.numel():
        block_n, block_d = _block_sizes(num_states, head_dim)
        _merge_states_kernel[(num_tokens * num_heads,)](
            outs, lses, out, lse, num_states, num_heads, *outs.stride(), *lses.stride(),
            HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=block_d)
    return out, lse


def scale_own(out: torch.Tensor, lses: torch.Tensor,
              own_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the combine, to be summed over ranks (reduce-scatter): out [T, H, D]
    (this rank's partial), lses [N, T, H] fp32 (every rank's) -> (out * exp(lse_own - lse) in
    out.dtype, 0 where that factor is 0; lse [T, H] fp32)."""
    _check_own(out, lses, own_rank)
    num_tokens, num_heads, head_dim = out.shape
    scaled = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    lse = torch.empty(out.shape[:2], dtype=torch.float32, device=out.device)
    if scaled.numel():
        block_n, block_d = _block_sizes(lses.shape[0], head_dim)
        _scale_own_kernel[(num_tokens * num_heads,)](
            out, lses, scaled, lse, own_rank, lses.shape[0], num_heads, *out.stride(),
            *lses.stride(), HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=block_d)
    return scaled, lse


def _clean_lses(lses: torch.Tensor) -> torch.Tensor:
    return lses.float().masked_fill(lses.isnan() | (lses == float("inf")), float("-inf"))


def merge_states_ref(outs: torch.Tensor, lses: torch.Tensor,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `merge_states`."""
    _check_states(outs, lses)
    lse_n = _clean_lses(lses)  # [N, T, H]
    lse = torch.logsumexp(lse_n, dim=0)  # [T, H]; -inf where every part is empty
    weight = torch.where(lse_n == float("-inf"), 0.0, torch.exp(lse_n - lse))
    parts = torch.where(weight[..., None] > 0, weight[..., None] * outs.float(), 0.0)
    return parts.sum(dim=0).to(out_dtype or outs.dtype), lse


def scale_own_ref(out: torch.Tensor, lses: torch.Tensor,
                  own_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `scale_own`."""
    _check_own(out, lses, own_rank)
    lse_n = _clean_lses(lses)  # [N, T, H]
    lse = torch.logsumexp(lse_n, dim=0)  # [T, H]
    factor = torch.where(lse_n[own_rank] == float("-inf"), 0.0, torch.exp(lse_n[own_rank] - lse))
    scaled = torch.where(factor[..., None] > 0, out.float() * factor[..., None], 0.0)
    return scaled.to(out.dtype), lse
