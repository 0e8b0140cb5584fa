"""CUDA graphs for decode steps: one graph per batch size and length bound, captured largest first
in a shared memory pool, replaying over the persistent DecodeBuffers. A batch is padded up to the
next captured size (padding rows: slot -1, length 0) and replays the graph of the smallest bound
that holds its longest rank-local context: the attention backend names the bounds at which its
decode launch changes (Triton: one split for short contexts); prefill and larger batches run
eagerly.

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
    def __init__(self, batch_sizes: list[int] | None = None):
        self.requested_sizes = batch_sizes
        self.sizes: list[int] = []
        self.length_bounds: list[int] = []  # rank-local context bounds, each captured per size
        # (size, bound) -> graph, output
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.num_replayed = 0
        self.num_eager = 0

    def capture(self, step_fn: Callable[[StepInputs], Any], buffers: DecodeBuffers,
                length_buckets: tuple[int, ...] = ()) -> None:
        self._step_fn = step_fn
        wanted = self.requested_sizes or default_batch_sizes(buffers.max_num_reqs)
        self.sizes = sorted(s for s in wanted if 0 < s <= buffers.max_num_reqs)
        longest = buffers.max_local_seq_len
        self.length_bounds = sorted({b for b in length_buckets if 0 < b < longest} | {longest})
        pool = torch.cuda.graph_pool_handle()
        # Captured at high priority: when the shared experts (a side stream, default priority)
        # and the routing or routed experts both have work, the latter get SMs first.
        stream = torch.cuda.Stream(priority=-1)
        try:
            for size in reversed(self.sizes):
                for bound in reversed(self.length_bounds):
                    buffers.stage_padding(size)
                    inputs = buffers.inputs(size, bound)
                    step_fn(inputs)  # warm-up: compiles kernels, settles allocations
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        output = step_fn(inputs)
                    self.graphs[size, bound] = (graph, output)
        except RuntimeError as e:
            raise RunnerError(f"graph=cuda: capturing the decode step failed ({e}); "
                              f"use graph=eager") from None
        torch.cuda.synchronize()

    def padded_size(self, num_reqs: int) -> int:
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else num_reqs

    def length_bound(self, max_local_seq_len: int) -> int | None:
        """The smallest captured bound that holds a batch's longest rank-local context."""
        i = bisect.bisect_left(self.length_bounds, max_local_seq_len)
        return self.length_bounds[i] if i < len(self.length_bounds) else None

    def replay(self, inputs: StepInputs) -> Any:
        key = (inputs.input_ids.shape[0], self.length_bound(inputs.meta.max_local_seq_len))
        if key not in self.graphs:
            self.num_eager += 1
            return self._step_fn(inputs)
        graph, output = self.graphs[key]
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
        bounds = "" if len(self.length_bounds) < 2 else (
            f", each at contexts up to {', '.join(map(str, self.length_bounds))}")
        return (f"cuda ({len(self.sizes)} decode sizes, up to "
                f"{self.sizes[-1] if self.sizes else 0}{bounds})")
