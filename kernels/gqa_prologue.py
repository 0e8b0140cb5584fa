"""GQA attention's per-token prologue in one launch (three before: the rotary and the cache
writes of K and of V): the rotary of the query and key heads (Llama's rotate-half pairs, in
fp32, cast once to the input dtype, as kernels/rotary.py's reference), and, optionally, the
rotated keys and the values stored in their slot of the paged cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel
from kernels.kv_write import check_slots, write_kv_ref
from kernels.rotary import rotary_ref, rotate_pairs


@triton.jit
def _gqa_prologue_kernel(qk_ptr, v_ptr, cos_ptr, sin_ptr, qk_out_ptr, k_cache_ptr, v_cache_ptr,
                         slots_ptr, num_heads, num_kv_heads, half_dim, head_dim, block_size,
                         qk_stride_t, qk_stride_h, v_stride_t, v_stride_h, cs_stride_t,
                         out_stride_t, out_stride_h, cache_stride_b, cache_stride_o,
                         cache_stride_h, WRITE_CACHE: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_KV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BLOCK_R)[None, :]
    pair_mask = pairs < half_dim
    cos = tl.load(cos_ptr + t * cs_stride_t + pairs, mask=pair_mask, other=0.0)  # [1, BLOCK_R]
    sin = tl.load(sin_ptr + t * cs_stride_t + pairs, mask=pair_mask, other=0.0)
    heads = tl.arange(0, BLOCK_H)[:, None]  # query heads, then key heads
    qk_row = qk_ptr + t * qk_stride_t
    out_row = qk_out_ptr + t * out_stride_t
    rotate_pairs(qk_row + heads * qk_stride_h, out_row + heads * out_stride_h, pairs,
                 pairs + half_dim, cos, sin, (heads < num_heads + num_kv_heads) & pair_mask)
    if WRITE_CACHE:
        slot = tl.load(slots_ptr + t)  # int64; < 0: no row here (padding, another DCP rank)
        in_cache = slot >= 0
        slot = tl.maximum(slot, 0)
        kv_heads = tl.arange(0, BLOCK_KV)[:, None]
        head_mask = (kv_heads < num_kv_heads) & in_cache  # [BLOCK_KV, 1]
        cache_rows = ((slot // block_size) * cache_stride_b + (slot % block_size) * cache_stride_o
                      + kv_heads * cache_stride_h)  # [BLOCK_KV, 1]
        # the same rotation as the key rows of qk_out, so the cache holds the same values
        rotate_pairs(qk_row + (num_heads + kv_heads) * qk_stride_h, k_cache_ptr + cache_rows,
                     pairs, pairs + half_dim, cos, sin, head_mask & pair_mask)
        dims = tl.arange(0, BLOCK_D)[None, :]
        v_mask = head_mask & (dims < head_dim)
        v = tl.load(v_ptr + t * v_stride_t + kv_heads * v_stride_h + dims, mask=v_mask)
        tl.store(v_cache_ptr + cache_rows + dims, v, mask=v_mask)


def _check_inputs(qk, v, cos, sin, qk_out, k_cache, v_cache, slots) -> None:
    if qk.dim() != 3 or v.dim() != 3 or qk.shape[0] != v.shape[0] or qk.shape[2] != v.shape[2]:
        raise ValueError(f"gqa_prologue: qk must be [T, Hq + Hkv, D] and v [T, Hkv, D]; got "
                         f"{tuple(qk.shape)} and {tuple(v.shape)}")
    num_tokens, num_qk_heads, head_dim = qk.shape
    num_kv_heads = v.shape[1]
    if head_dim % 2 or num_qk_heads <= num_kv_heads:
        raise ValueError(f"gqa_prologue: D must be even and qk must hold query heads before the "
                         f"{num_kv_heads} key heads; got qk {tuple(qk.shape)}")
    if cos.shape != (num_tokens, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"gqa_prologue: cos/sin must be [{num_tokens}, {head_dim // 2}]; got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if qk_out.shape != qk.shape or qk_out.dtype != qk.dtype or v.dtype != qk.dtype:
        raise ValueError(f"gqa_prologue: qk_out must be {tuple(qk.shape)} and v {qk.dtype}; got "
                         f"{tuple(qk_out.shape)} {qk_out.dtype} and v {v.dtype}")
    if any(t.stride(-1) != 1 for t in (qk, v, cos, sin, qk_out)) or sin.stride() != cos.stride():
        raise ValueError("gqa_prologue: every tensor needs unit stride in its last dim, and sin "
                         "must have cos's strides")
    caches = () if k_cache is None else (k_cache, v_cache)
    if k_cache is not None and (v_cache is None or any(
            c.dim() != 4 or c.shape[2:] != (num_kv_heads, head_dim) or c.dtype != qk.dtype
            or c.stride() != k_cache.stride() or c.stride(-1) != 1 for c in caches)):
        got = [None if c is None else (tuple(c.shape), c.dtype, c.stride()) for c in caches]
        raise ValueError(f"gqa_prologue: k_cache and v_cache must be [num_blocks, B, "
                         f"{num_kv_heads}, {head_dim}] {qk.dtype} with the same strides, unit in "
                         f"the last dim; got {got}")
    if k_cache is not None:
        check_slots(slots, num_tokens, "gqa_prologue: ")
    if qk.numel() and qk_out.untyped_storage().data_ptr() == qk.untyped_storage().data_ptr():
        raise ValueError("gqa_prologue: qk_out must not share qk's storage (the cache write "
                         "reads qk after qk_out is written)")
    tensors = (qk, v, cos, sin, qk_out) + (() if k_cache is None else (*caches, slots))
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"gqa_prologue: every tensor must be on one device; got "
                         f"{sorted({str(t.device) for t in tensors})}")


def gqa_prologue(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 qk_out: torch.Tensor, k_cache: torch.Tensor | None,
                 v_cache: torch.Tensor | None, slots: torch.Tensor) -> None:
    """qk_out [T, Hq + Hkv, D] = rope(qk [T, Hq + Hkv, D]) with cos/sin [T, D/2] fp32 (query
    heads, then key heads; rows may be strided views of the qkv projection; qk_out a separate
    tensor). Unless k_cache is None, the rotated keys and v [T, Hkv, D] are also stored in
    k_cache / v_cache [num_blocks, B, Hkv, D] at slot slots[t] (int64; < 0 skipped)."""
    _check_inputs(qk, v, cos, sin, qk_out, k_cache, v_cache, slots)
    num_tokens, num_qk_heads, head_dim = qk.shape
    num_kv_heads = v.shape[1]
    cache = qk_out if k_cache is None else k_cache  # any pointer when nothing is written
    if num_tokens:
        _gqa_prologue_kernel[(num_tokens,)](
            qk, v, cos, sin, qk_out, cache, cache if v_cache is None else v_cache, slots,
            num_qk_heads - num_kv_heads, num_kv_heads, head_dim // 2, head_dim,
            1 if k_cache is None else k_cache.shape[1], *qk.stride()[:2], *v.stride()[:2],
            cos.stride(0), *qk_out.stride()[:2],
            *((0, 0, 0) if k_cache is None else k_cache.stride()[:3]),
            WRITE_CACHE=k_cache is not None, BLOCK_H=triton.next_power_of_2(num_qk_heads),
            BLOCK_KV=triton.next_power_of_2(num_kv_heads),
            BLOCK_R=triton.next_power_of_2(head_dim // 2),
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4, **dependent_launch(qk.device))


def gqa_prologue_ref(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     qk_out: torch.Tensor, k_cache: torch.Tensor | None,
                     v_cache: torch.Tensor | None, slots: torch.Tensor) -> None:
    """Plain-torch `gqa_prologue`."""
    _check_inputs(qk, v, cos, sin, qk_out, k_cache, v_cache, slots)
    qk_out.copy_(rotary_ref(qk, cos, sin, interleaved=False))
    if k_cache is not None:
        write_kv_ref(k_cache, slots, qk_out[:, qk.shape[1] - v.shape[1]:])
        write_kv_ref(v_cache, slots, v)
