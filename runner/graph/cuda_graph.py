"""CUDA graphs for decode steps: one graph per batch size, captured largest first in a shared
memory pool, replaying over the persistent DecodeBuffers. A batch is padded up to the next
captured size (padding rows: slot -1, length 0); prefill and larger batches run eagerly.

Collectives (TP all-reduce, DCP gathers) are captured too: their communicators exist before
capture and every rank captures the same sizes in the same order."""
from __future__ import annotations

import bisect
from typing import Callable

import torch

from runner.errors import RunnerError
from runner.step_inputs import DecodeBuffers, StepInputs


def default_batch_sizes(max_num_reqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... (steps of 8) up to max_num_reqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_reqs]
    sizes += list(range(16, max_num_reqs, 8))
    return sorted(set(sizes + [max_num_reqs]))


class CudaGraph:
    uses_static_max_len = True  # kernels see the same length bound at capture and replay

    def __init__(self, batch_sizes: list[int] | None = None):
        self.requested_sizes = batch_sizes
        self.sizes: list[int] = []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replayed = 0
        self.num_eager = 0

    def capture(self, forward: Callable[[StepInputs], torch.Tensor],
                buffers: DecodeBuffers) -> None:
        self._forward = forward
        wanted = self.requested_sizes or default_batch_sizes(buffers.max_num_reqs)
        self.sizes = sorted(s for s in wanted if 0 < s <= buffers.max_num_reqs)
        pool = torch.cuda.graph_pool_handle()
        try:
            for size in reversed(self.sizes):
                buffers.fill_padding(size)
                inputs = buffers.inputs(size, buffers.max_local_seq_len)
                forward(inputs)  # warm-up: compiles kernels, settles allocations
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = forward(inputs)
                self.graphs[size] = (graph, hidden)
        except RuntimeError as e:
            raise RunnerError(f"graph=cuda: capturing the decode step failed ({e}); "
                              f"use graph=eager") from None
        torch.cuda.synchronize()

    def padded_size(self, num_reqs: int) -> int:
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else num_reqs

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        size = inputs.input_ids.shape[0]
        if size not in self.graphs:
            self.num_eager += 1
            return self._forward(inputs)
        graph, hidden = self.graphs[size]
        graph.replay()
        self.num_replayed += 1
        return hidden

    @property
    def replay_fraction(self) -> float:
        total = self.num_replayed + self.num_eager
        return self.num_replayed / total if total else 0.0

    def release(self) -> None:
        """Free the graphs before the process groups are destroyed (clean NCCL teardown)."""
        self.graphs.clear()
        torch.cuda.synchronize()

    def describe(self) -> str:
        return f"cuda ({len(self.sizes)} decode sizes, up to {self.sizes[-1] if self.sizes else 0})"
