"""Programmatic dependent launch: off on the CPU and in the interpreter; on a GPU of compute
capability 9.0+, a chain of dependent kernels (each reads what the previous one wrote) launched
with it, eagerly and in a CUDA graph, loses no write."""
import os

import pytest
import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel


@triton.jit
def _add_one_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def _chain(a: torch.Tensor, b: torch.Tensor, num_kernels: int) -> None:
    """a, b ping-pong: after an even number of kernels, a holds its start + num_kernels."""
    grid = (triton.cdiv(a.numel(), 1024),)
    for i in range(num_kernels):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        _add_one_kernel[grid](src, dst, a.numel(), BLOCK=1024, **dependent_launch(a.device))


def test_off_on_the_cpu_and_in_the_interpreter(monkeypatch):
    assert dependent_launch(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dependent_launch(torch.device("cuda", 0)) == {"PDL": False, "launch_pdl": False}
    a, b = torch.zeros(3000), torch.zeros(3000)
    _chain(a, b, 4)
    assert torch.equal(a, torch.full_like(a, 4.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_gpu_dependent_kernels_see_every_write():
    device = torch.device("cuda", torch.cuda.current_device())
    on = torch.cuda.get_device_capability(device) >= (9, 0)
    assert dependent_launch(device) == {"PDL": on, "launch_pdl": on}
    a = torch.zeros(8 << 20, device=device)  # 8M elements: many programs per kernel
    b = torch.zeros_like(a)
    _chain(a, b, 200)
    torch.cuda.synchronize()
    assert torch.equal(a, torch.full_like(a, 200.0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _chain(a, b, 200)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(a, torch.full_like(a, 800.0))
