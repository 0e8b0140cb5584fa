"""Programmatic dependent launch (Hopper and later GPUs): a kernel launched with launch_pdl=True
may be scheduled while the kernel before it on the stream is still finishing; its first statement,
wait_for_previous_kernel, holds it until that kernel's writes are visible. The gap between two
kernels shrinks. A decode layer's Triton kernels take it: TPOT 9.40 / 9.41 -> 9.34 / 9.33 ms (one
H200, dsv2lite, the seed workload). Letting the small kernels also release their dependents at
once (release_next_kernel) was slower, 9.46: the waiting programs hold SMs. Only the router's
logits kernel does (-0.05 ms): its dependent, the top-k, is small, and resident early it no
longer waits for SMs behind the shared experts' GEMM on the side stream."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.dot_operands import interpreting


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """The first statement of a kernel launched with dependent_launch(...)'s arguments."""
    if PDL:
        gdc_wait()


@triton.jit
def release_next_kernel(PDL: tl.constexpr):
    """Lets the next kernel (launched with dependent_launch) start now: its programs take SMs and
    wait in wait_for_previous_kernel, which still waits for this whole kernel."""
    if PDL:
        gdc_launch_dependents()


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def dependent_launch(device: torch.device) -> dict:
    """Launch arguments for a kernel that starts with wait_for_previous_kernel(PDL): PDL and
    launch_pdl, both True on a GPU of compute capability 9.0 or later (not in the interpreter)."""
    enabled = device.type == "cuda" and not interpreting() and _supported(
        device.index if device.index is not None else torch.cuda.current_device())
    return {"PDL": enabled, "launch_pdl": enabled}
