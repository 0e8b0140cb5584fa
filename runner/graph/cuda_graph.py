"""CUDA graphs for decode steps: one graph per batch size, captured largest first in a shared
memory pool, replaying over the persistent DecodeBuffers. A batch is padded up to the next
captured size (padding rows: slot -1, length 0); prefill and larger batches run eagerly.

Collectives (TP all-reduce, DCP gathers) are captured too: their communicators exist before
capture and every rank captures the same sizes in the same order."""
from __future__ import annotations

import bisect
from typing import Any, Callable

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
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}  # size -> graph, output
        self.num_replayed = 0
        self.num_eager = 0

    def capture(self, step_fn: Callable[[StepInputs], Any], buffers: DecodeBuffers) -> None:
        self._step_fn = step_fn
        wanted = self.requested_sizes or default_batch_sizes(buffers.max_num_reqs)
        self.sizes = sorted(s for s in wanted if 0 < s <= buffers.max_num_reqs)
        pool = torch.cuda.graph_pool_handle()
        try:
            for size in reversed(self.sizes):
                buffers.stage_padding(size)
                inputs = buffers.inputs(size, buffers.max_local_seq_len)
                step_fn(inputs)  # warm-up: compiles kernels, settles allocations
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    output = step_fn(inputs)
                self.graphs[size] = (graph, output)
        except RuntimeError as e:
            raise RunnerError(f"graph=cuda: capturing the decode step failed ({e}); "
                              f"use graph=eager") from None
        torch.cuda.synchronize()

    def padded_size(self, num_reqs: int) -> int:
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else num_reqs

    def replay(self, inputs: StepInputs) -> Any:
        size = inputs.input_ids.shape[0]
        if size not in self.graphs:
            self.num_eager += 1
            return self._step_fn(inputs)
        graph, output = self.graphs[size]
        graph.replay()
        self.num_replayed += 1
        return output

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
