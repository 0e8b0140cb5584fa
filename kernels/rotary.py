"""Rotary position embedding: the pair rotation the attention prologue kernels share
(kernels/mla_norm_rope.py, kernels/gqa_prologue.py) and its torch reference. x [T, H, D] is
rotated by cos/sin [T, D/2] in fp32 and cast once to x's dtype. Pairs are either interleaved
(x[2i], x[2i+1]: DeepSeek) or halves (x[i], x[i + D/2]: Llama's rotate-half)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_pairs(src_ptr, dest_ptr, first, second, cos, sin, mask):
    """Rotate the pairs (src[first], src[second]) by cos/sin in fp32 into dest[first],
    dest[second], in src's dtype (a device function of the prologue kernels)."""
    a = tl.load(src_ptr + first, mask=mask, other=0.0)
    b = tl.load(src_ptr + second, mask=mask, other=0.0)
    af, bf = a.to(tl.float32), b.to(tl.float32)
    tl.store(dest_ptr + first, (af * cos - bf * sin).to(a.dtype), mask=mask)
    tl.store(dest_ptr + second, (bf * cos + af * sin).to(a.dtype), mask=mask)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, D/2] (float32), returned in x's dtype."""
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
