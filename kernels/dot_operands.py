"""How the kernels' tl.dot takes its operands. On the GPU, 16-bit inputs stay 16-bit (exact
products, fp32 sums) and fp32 inputs use IEEE fp32 dots (Triton's fp32 default is TF32). Triton's
interpreter computes 16-bit dots wrongly, so there every input is upcast to IEEE fp32 dots."""
from __future__ import annotations

import os

import torch
import triton.language as tl

DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_operands(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(operand dtype, input_precision) for inputs of `dtype`, one of DOT_DTYPES."""
    if dtype == torch.float32 or interpreting():
        return tl.float32, "ieee"
    return DOT_DTYPES[dtype], "tf32"  # "tf32" is ignored for 16-bit operands
