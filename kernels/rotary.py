"""Rotary position embedding in one launch: x [T, H, D] (strided rows and heads) rotated by
cos/sin [T, D/2] in fp32, written in x's dtype to a new tensor or to a given strided view.
Pairs are either interleaved (x[2i], x[2i+1]: DeepSeek) or halves (x[i], x[i + D/2]: Llama's
rotate-half)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_pairs(src_ptr, dest_ptr, first, second, cos, sin, mask):
    """Rotate the pairs (src[first], src[second]) by cos/sin in fp32 into dest[first],
    dest[second], in src's dtype (a device function of this and the MLA prologue kernel)."""
    a = tl.load(src_ptr + first, mask=mask, other=0.0)
    b = tl.load(src_ptr + second, mask=mask, other=0.0)
    af, bf = a.to(tl.float32), b.to(tl.float32)
    tl.store(dest_ptr + first, (af * cos - bf * sin).to(a.dtype), mask=mask)
    tl.store(dest_ptr + second, (bf * cos + af * sin).to(a.dtype), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, half_dim,
                   x_stride_t, x_stride_h, cs_stride_t, out_stride_t, out_stride_h,
                   INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    pairs = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (pairs < half_dim)
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + half_dim
    cos = tl.load(cos_ptr + t * cs_stride_t + pairs, mask=pairs < half_dim, other=0.0)
    sin = tl.load(sin_ptr + t * cs_stride_t + pairs, mask=pairs < half_dim, other=0.0)
    rotate_pairs(x_ptr + t * x_stride_t + heads * x_stride_h,
                 out_ptr + t * out_stride_t + heads * out_stride_h, first, second, cos, sin, mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H, D] (unit stride in D), cos/sin [T, D/2] fp32 -> rotated [T, H, D] in x.dtype
    (new, or written into `out`, a [T, H, D] view with unit stride in D)."""
    if x.dim() != 3 or x.stride(-1) != 1 or x.shape[-1] % 2:
        raise ValueError(f"rotary: x must be [T, H, D] with even D and unit stride in D; got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    half_dim = x.shape[-1] // 2
    if cos.shape != (x.shape[0], half_dim) or sin.shape != cos.shape or cos.stride(-1) != 1:
        raise ValueError(f"rotary: cos/sin must be [{x.shape[0]}, {half_dim}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"rotary: out {tuple(out.shape)} {out.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype} with unit stride in D")
    if x.shape[0]:
        _rotary_kernel[(x.shape[0],)](
            x, cos, sin, out, x.shape[1], half_dim, x.stride(0), x.stride(1), cos.stride(0),
            out.stride(0), out.stride(1), INTERLEAVED=interleaved,
            BLOCK_H=triton.next_power_of_2(x.shape[1]), BLOCK_D=triton.next_power_of_2(half_dim))
    return out


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """Plain-torch `rotary`."""
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
    else:
        a, b = xf.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    first, second = a * cos - b * sin, b * cos + a * sin
    if interleaved:
        return torch.stack((first, second), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((first, second), dim=-1).to(x.dtype)
