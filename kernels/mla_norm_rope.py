"""MLA's per-token prologue in one launch (four before: an RMSNorm, two rotaries and the cache
write): the latent's RMSNorm and the key's rotary make the cache row, written to a plain buffer
and (optionally) to its slot of the paged cache; the query's rotary writes the rope part of the
attention query. Rounding as kernels/rms_norm.py and kernels/rotary.py (interleaved pairs,
DeepSeek's layout): statistics and rotation in fp32, each result cast once to the input dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel
from kernels.kv_write import check_slots, write_kv_ref
from kernels.rms_norm import rms_norm_ref, weighted_rms_norm
from kernels.rotary import rotary_ref, rotate_pairs


@triton.jit
def _mla_norm_rope_kernel(latent_ptr, k_pe_ptr, q_pe_ptr, weight_ptr, cos_ptr, sin_ptr,
                          kv_ptr, q_out_ptr, cache_ptr, slots_ptr, eps, latent_size, half_rope,
                          num_heads, block_size, latent_stride_t, k_pe_stride_t, q_stride_t,
                          q_stride_h, cs_stride_t, kv_stride_t, q_out_stride_t, q_out_stride_h,
                          cache_stride_b, cache_stride_o, WRITE_CACHE: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                          PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < latent_size
    x = tl.load(latent_ptr + t * latent_stride_t + cols, mask=col_mask, other=0.0)
    kv_row = kv_ptr + t * kv_stride_t
    normed = weighted_rms_norm(x, weight_ptr, cols, col_mask, latent_size, eps)
    tl.store(kv_row + cols, normed.to(kv_ptr.dtype.element_ty), mask=col_mask)
    if WRITE_CACHE:
        slot = tl.load(slots_ptr + t)  # int64; < 0: no row here (padding, another DCP rank)
        in_cache = slot >= 0
        slot = tl.maximum(slot, 0)
        cache_row = (cache_ptr + (slot // block_size) * cache_stride_b
                     + (slot % block_size) * cache_stride_o)
        tl.store(cache_row + cols, normed.to(cache_ptr.dtype.element_ty),
                 mask=col_mask & in_cache)

    pairs = tl.arange(0, BLOCK_R)
    pair_mask = pairs < half_rope
    cos = tl.load(cos_ptr + t * cs_stride_t + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(sin_ptr + t * cs_stride_t + pairs, mask=pair_mask, other=0.0)
    # the key's rope part follows the latent in the cache row
    rotate_pairs(k_pe_ptr + t * k_pe_stride_t, kv_row + latent_size, 2 * pairs, 2 * pairs + 1,
                 cos, sin, pair_mask)
    if WRITE_CACHE:
        rotate_pairs(k_pe_ptr + t * k_pe_stride_t, cache_row + latent_size, 2 * pairs,
                     2 * pairs + 1, cos, sin, pair_mask & in_cache)
    heads = tl.arange(0, BLOCK_H)[:, None]
    rotate_pairs(q_pe_ptr + t * q_stride_t + heads * q_stride_h,
                 q_out_ptr + t * q_out_stride_t + heads * q_out_stride_h, 2 * pairs[None, :],
                 2 * pairs[None, :] + 1, cos[None, :], sin[None, :],
                 (heads < num_heads) & pair_mask[None, :])


def _check_inputs(latent, k_pe, q_pe, weight, cos, sin, kv_out, q_pe_out, cache,
                  slots) -> None:
    if latent.dim() != 2 or weight.shape != latent.shape[1:]:
        raise ValueError(f"mla_norm_rope: latent must be [T, C] and weight [C]; got "
                         f"{tuple(latent.shape)} and {tuple(weight.shape)}")
    num_tokens, latent_size = latent.shape
    rope_dim = k_pe.shape[-1]
    if k_pe.shape != (num_tokens, rope_dim) or rope_dim % 2:
        raise ValueError(f"mla_norm_rope: k_pe must be [T={num_tokens}, R] with even R; got "
                         f"{tuple(k_pe.shape)}")
    if q_pe.dim() != 3 or (q_pe.shape[0], q_pe.shape[2]) != (num_tokens, rope_dim):
        raise ValueError(f"mla_norm_rope: q_pe must be [T={num_tokens}, H, R={rope_dim}]; got "
                         f"{tuple(q_pe.shape)}")
    if cos.shape != (num_tokens, rope_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"mla_norm_rope: cos/sin must be [{num_tokens}, {rope_dim // 2}]; got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if kv_out.shape != (num_tokens, latent_size + rope_dim) or q_pe_out.shape != q_pe.shape:
        raise ValueError(f"mla_norm_rope: kv_out must be [{num_tokens}, {latent_size + rope_dim}]"
                         f" and q_pe_out {tuple(q_pe.shape)}; got {tuple(kv_out.shape)} and "
                         f"{tuple(q_pe_out.shape)}")
    if any(t.stride(-1) != 1 for t in (latent, k_pe, q_pe, cos, sin, kv_out, q_pe_out)):
        raise ValueError("mla_norm_rope: every tensor needs unit stride in its last dim")
    if sin.stride() != cos.stride() or not weight.is_contiguous():
        raise ValueError("mla_norm_rope: sin needs cos's strides and weight must be contiguous")
    if cache is not None and (cache.dim() != 4 or cache.shape[2:] != (1, latent_size + rope_dim)
                              or cache.stride(-1) != 1 or cache.dtype != latent.dtype):
        raise ValueError(f"mla_norm_rope: cache must be [num_blocks, B, 1, "
                         f"{latent_size + rope_dim}] {latent.dtype} with unit stride in its last "
                         f"dim; got {tuple(cache.shape)} {cache.dtype}")
    if cache is not None:
        check_slots(slots, num_tokens, "mla_norm_rope: ")
    tensors = (latent, k_pe, q_pe, weight, cos, sin, kv_out, q_pe_out) + (
        () if cache is None else (cache, slots))
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"mla_norm_rope: every tensor must be on one device; got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if kv_out.dtype != latent.dtype or q_pe_out.dtype != q_pe.dtype:
        raise ValueError(f"mla_norm_rope: kv_out and q_pe_out must be {latent.dtype} and "
                         f"{q_pe.dtype}; got {kv_out.dtype} and {q_pe_out.dtype}")


def mla_norm_rope(latent: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor,
                  weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  kv_out: torch.Tensor, q_pe_out: torch.Tensor, cache: torch.Tensor | None,
                  slots: torch.Tensor) -> None:
    """kv_out [T, C + R] = [rms_norm(latent [T, C]) * weight [C], rope(k_pe [T, R])] and
    q_pe_out [T, H, R] = rope(q_pe [T, H, R]), cos/sin [T, R/2] fp32; rows may be strided views
    (e.g. the rope columns of the attention query). Unless cache is None, each kv_out row is also
    stored in cache [num_blocks, B, 1, C + R] at slot slots[t] (int64; < 0 skipped)."""
    _check_inputs(latent, k_pe, q_pe, weight, cos, sin, kv_out, q_pe_out, cache, slots)
    num_tokens, latent_size = latent.shape
    num_heads, rope_dim = q_pe.shape[1:]
    if num_tokens:
        _mla_norm_rope_kernel[(num_tokens,)](
            latent, k_pe, q_pe, weight, cos, sin, kv_out, q_pe_out,
            kv_out if cache is None else cache, slots, eps, latent_size, rope_dim // 2, num_heads,
            1 if cache is None else cache.shape[1], latent.stride(0), k_pe.stride(0),
            *q_pe.stride()[:2], cos.stride(0), kv_out.stride(0), *q_pe_out.stride()[:2],
            *((0, 0) if cache is None else cache.stride()[:2]), WRITE_CACHE=cache is not None,
            BLOCK_C=triton.next_power_of_2(latent_size),
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_R=triton.next_power_of_2(rope_dim // 2), num_warps=4,
            **dependent_launch(latent.device))


def mla_norm_rope_ref(latent: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor,
                      weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      kv_out: torch.Tensor, q_pe_out: torch.Tensor, cache: torch.Tensor | None,
                      slots: torch.Tensor) -> None:
    """Plain-torch `mla_norm_rope`."""
    _check_inputs(latent, k_pe, q_pe, weight, cos, sin, kv_out, q_pe_out, cache, slots)
    latent_size = latent.shape[1]
    kv_out[:, :latent_size] = rms_norm_ref(latent, weight, eps)
    kv_out[:, latent_size:] = rotary_ref(k_pe[:, None], cos, sin, interleaved=True)[:, 0]
    q_pe_out.copy_(rotary_ref(q_pe, cos, sin, interleaved=True))
    if cache is not None:
        write_kv_ref(cache, slots, kv_out[:, None])
