"""Paged KV-cache store: token t's row x[t] goes to slot slots[t] (block slot // B, offset
slot % B); negative slots (padding, or a token another DCP rank owns) are skipped. The cache may
be a strided view, e.g. the latent part cache[..., :512] of a 576-wide MLA cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_D = 1024  # head-dim elements per loop step


@triton.jit
def _write_kv_kernel(cache_ptr, slots_ptr, x_ptr, block_size,
                     cache_stride_b, cache_stride_o, cache_stride_h, cache_stride_d,
                     x_stride_t, x_stride_h, x_stride_d,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + token)  # int64
    block = slot // block_size
    offset = slot % block_size
    dst = cache_ptr + block * cache_stride_b + offset * cache_stride_o + head * cache_stride_h
    src = x_ptr + token * x_stride_t + head * x_stride_h
    write_dim = tl.where(slot >= 0, HEAD_DIM, 0)  # nothing is written for a negative slot
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        mask = d < write_dim
        row = tl.load(src + d * x_stride_d, mask=mask)
        tl.store(dst + d * cache_stride_d, row.to(cache_ptr.dtype.element_ty), mask=mask)


def check_slots(slots: torch.Tensor, num_tokens: int, prefix: str = "") -> None:
    """A cache write's slots: [num_tokens] int64 (this and the prologue kernels' check; prefix
    names the caller in the message)."""
    if slots.dim() != 1 or slots.dtype != torch.int64 or slots.shape[0] != num_tokens:
        raise ValueError(f"{prefix}slots must be [T={num_tokens}] int64; got "
                         f"{tuple(slots.shape)} {slots.dtype}")


def _check_inputs(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    if cache.dim() != 4 or not cache.dtype.is_floating_point:
        raise ValueError(f"cache must be [num_blocks, block_size, num_kv_heads, head_dim] "
                         f"floating point, got {tuple(cache.shape)} {cache.dtype}")
    if x.dim() != 3 or tuple(x.shape[1:]) != tuple(cache.shape[2:]):
        raise ValueError(f"x must be [T, {cache.shape[2]}, {cache.shape[3]}] to match the cache, "
                         f"got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    check_slots(slots, x.shape[0])
    if not cache.device == slots.device == x.device:
        raise ValueError(f"cache, slots and x must share a device, got {cache.device}, "
                         f"{slots.device}, {x.device}")


def write_kv(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store x [T, Hkv, D] into cache [num_blocks, B, Hkv, D] at slots [T] int64 (in place;
    slot < 0 skipped; x is cast to the cache dtype)."""
    _check_inputs(cache, slots, x)
    num_tokens, num_kv_heads, head_dim = x.shape
    if num_tokens and num_kv_heads and head_dim:
        _write_kv_kernel[(num_tokens, num_kv_heads)](
            cache, slots, x, cache.shape[1], *cache.stride(), *x.stride(),
            HEAD_DIM=head_dim, BLOCK_D=min(triton.next_power_of_2(head_dim), _MAX_BLOCK_D))


def write_kv_ref(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Plain-torch `write_kv`."""
    _check_inputs(cache, slots, x)
    mine = slots >= 0
    block_size = cache.shape[1]
    cache[slots[mine] // block_size, slots[mine] % block_size] = x[mine].to(cache.dtype)
