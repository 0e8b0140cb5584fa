"""Async scheduling (`scheduler.async_scheduling`, after vLLM's --async-scheduling): decode step
N+1 is scheduled, staged and launched before step N's tokens are read on the host, so the
host's bookkeeping overlaps the GPU's work instead of leaving the GPU idle between steps.

How: a launched greedy decode step is *held*: the step's greedy summary starts its copy to
pinned host memory and each of its requests counts one token in flight (`num_inflight`, so
lengths, block reservations and length limits already count it). Step N+1 feeds its rows'
tokens from the device (`DecodeBuffers.sampled_ids`, written by step N's graph). Reading step N
appends its tokens; a request that hit EOS at N is finished, and its row of step N+1 (the one
wasted row) is never read. Only decode-only continuations overlap: a batch with sampled
(temperature > 0) requests, a possible admission or a possible preemption reads step N first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.request import Request
from runner.sampler import StepLogits, greedy_tokens
from runner.scheduler import ScheduledBatch


@dataclass
class InflightStep:
    """A launched decode step whose tokens have not been read yet."""

    batch: ScheduledBatch
    greedy: torch.Tensor  # [R, 3] fp64 host copy (pinned on a GPU): token, its logit, lse
    ready: torch.cuda.Event | None  # recorded after the copy (None on CPU: already done)


class AsyncDecode:
    def __init__(self, max_num_seqs: int, device: torch.device):
        self.on_gpu = device.type == "cuda"
        # two host buffers: step N is read while step N+1's copy is queued
        self._host = torch.zeros(2, max_num_seqs, 3, dtype=torch.float64, pin_memory=self.on_gpu)
        self._next_buffer = 0
        self.num_overlapped = 0  # decode steps launched before the previous one was read

    @staticmethod
    def overlaps(batch: ScheduledBatch) -> bool:
        """Whether a step's tokens may be read after the next step is launched."""
        return not batch.is_prefill and all(r.params.temperature <= 0 for r in batch.requests)

    def hold(self, batch: ScheduledBatch, logits: StepLogits) -> InflightStep:
        """Start the copy of the step's greedy summary; count a token in flight per request."""
        host = self._host[self._next_buffer, :len(batch.requests)]
        self._next_buffer ^= 1
        host.copy_(logits.greedy, non_blocking=self.on_gpu)
        ready = None
        if self.on_gpu:
            ready = torch.cuda.Event()
            ready.record()
        for request in batch.requests:
            request.num_inflight += 1
        return InflightStep(batch, host, ready)

    @staticmethod
    def sources(batch: ScheduledBatch, previous: InflightStep) -> list[int]:
        """For each request of `batch`, its row in the held step (whose token it feeds)."""
        row_of = {r.req_id: i for i, r in enumerate(previous.batch.requests)}
        return [row_of[r.req_id] for r in batch.requests]

    @staticmethod
    def read(step: InflightStep) -> list[tuple[Request, int, float]]:
        """Wait for the step's tokens: (request, token, logprob) for every row still owed one
        (a request that stopped at EOS in the step before gets nothing)."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens, logprobs = greedy_tokens(step.greedy)
        owed = []
        for request, token, logprob in zip(step.batch.requests, tokens, logprobs):
            request.num_inflight -= 1
            if request.finish_reason is None:
                owed.append((request, token, logprob))
        return owed
