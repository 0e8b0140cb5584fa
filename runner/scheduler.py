"""Continuous batching: admit waiting requests, prefill them, decode the running ones, preempt by
recompute when blocks run out. Decisions depend only on the calls made (no clock, no hash
order), so every rank that makes the same calls schedules the same batches."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runner.kv_cache import BlockAllocator
from runner.request import Request, Status


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class ScheduledBatch:
    """One step: all requests prefill their full token list, or all decode one token."""

    is_prefill: bool
    requests: list[Request]


@dataclass
class StepLog:
    """What happened, for tests and the run summary."""

    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    num_preemptions: int = 0
    joined_while_decoding: int = 0  # prefills admitted while other requests were running
    events: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, virtual_block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int):
        self.allocator = allocator
        self.virtual_block_size = virtual_block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.log = StepLog()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def max_tokens_of(self, request: Request) -> int:
        """The most tokens the request can ever hold in the cache."""
        return min(len(request.prompt_token_ids) + request.params.max_tokens, self.max_model_len)

    def fits_alone(self, request: Request) -> bool:
        need = cdiv(self.max_tokens_of(request), self.virtual_block_size)
        return need <= self.allocator.num_blocks

    def schedule(self) -> ScheduledBatch | None:
        prefill = self._admit()
        if prefill:
            return ScheduledBatch(True, prefill)
        return self._decode_batch() if self.running else None

    def continue_decode(self) -> ScheduledBatch | None:
        """The running requests' next decode step if it needs no admission and no preemption
        (async scheduling launches it before the current step is read), else None."""
        if not self.running or self._can_admit() or (
                sum(map(self._blocks_needed, self.running)) > self.allocator.num_free):
            return None
        return self._decode_batch()

    def _decode_batch(self) -> ScheduledBatch:
        self._reserve_decode_slots()
        self.log.num_decode_steps += 1
        return ScheduledBatch(False, list(self.running))

    def _can_admit(self) -> bool:
        """Whether the next waiting request can start now."""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs and (
            cdiv(self.waiting[0].num_tokens, self.virtual_block_size) <= self.allocator.num_free)

    def _blocks_needed(self, request: Request) -> int:
        """New blocks a running request needs to hold all its tokens."""
        return max(0, cdiv(request.num_tokens, self.virtual_block_size) - len(request.block_ids))

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        num_tokens = 0
        was_running = bool(self.running)
        while self._can_admit():
            request = self.waiting[0]
            if num_tokens + request.num_tokens > self.max_num_batched_tokens and batch:
                break
            self.waiting.popleft()
            request.block_ids = self.allocator.allocate(
                cdiv(request.num_tokens, self.virtual_block_size))
            request.status = Status.RUNNING
            self.running.append(request)
            batch.append(request)
            num_tokens += request.num_tokens
        if batch:
            self.log.num_prefill_steps += 1
            if was_running:
                self.log.joined_while_decoding += len(batch)
        return batch

    def _reserve_decode_slots(self) -> None:
        """Give every running request room for one more token, preempting the newest
        requests (by recompute) while blocks run out."""
        i = 0
        while i < len(self.running):
            request = self.running[i]
            need = self._blocks_needed(request)
            if need == 0:
                i += 1
                continue
            new_ids = self.allocator.allocate(need)
            if new_ids is not None:
                request.block_ids.extend(new_ids)
                i += 1
                continue
            self._preempt(self.running[-1])

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.log.num_preemptions += 1
        self.log.events.append(f"preempt {request.req_id} at {request.num_tokens} tokens")

    def stop_running(self, request: Request) -> None:
        """Take a request out of the batch and free its blocks (its last token is in flight)."""
        if request in self.running:
            self.running.remove(request)
        self.allocator.free(request.block_ids)
        request.block_ids = []

    def finish(self, request: Request, reason: str) -> None:
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.stop_running(request)
