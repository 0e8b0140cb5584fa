"""silu(gate) * up of a gated MLP in one launch: gate_up [T, 2I] (gate columns, then up columns,
as the fused gate/up projection writes them) -> [T, I]. The torch form takes two launches and a
[T, I] temporary; this one reads gate_up once. Rounding as the reference models:
silu(gate) in gate's dtype, then the product in that dtype (computed in fp32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel

BLOCK = 1024  # columns per program


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, intermediate_size, in_stride, out_stride,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(gate_up_ptr + row * in_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * in_stride + intermediate_size + cols, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    act = (gate_f / (1.0 + tl.exp(-gate_f))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (unit column stride) -> silu(gate_up[:, :I]) * gate_up[:, I:] [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate_up must be [T, 2I] with unit column stride; got "
                         f"{tuple(gate_up.shape)} strides {gate_up.stride()}")
    num_tokens, intermediate_size = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_tokens, intermediate_size)
    if out.numel():
        _silu_mul_kernel[(num_tokens, triton.cdiv(intermediate_size, BLOCK))](
            gate_up, out, intermediate_size, gate_up.stride(0), out.stride(0), BLOCK=BLOCK,
            **dependent_launch(gate_up.device))
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
