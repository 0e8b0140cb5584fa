"""runner/scheduler.py on its own: a small block allocator and hand-made requests, with the runner's
part (one sampled token per scheduled request, finishing) played by the test. Expected batches
are worked out by hand; a seeded random workload checks the invariants and determinism."""
from __future__ import annotations

import random

import pytest

from runner.kv_cache import BlockAllocator
from runner.request import Request, SamplingParams, Status
from runner.scheduler import ScheduledBatch, Scheduler

BLOCK = 4  # virtual block size: tokens per block id


def _scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 256,
               max_model_len: int = 64) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), BLOCK, max_num_seqs, max_num_batched_tokens,
                     max_model_len)


def _add(scheduler: Scheduler, prompt_lens: list[int], max_tokens: int = 8,
         first_id: int = 0) -> list[Request]:
    requests = [Request(first_id + i, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens))
                for i, n in enumerate(prompt_lens)]
    for request in requests:
        scheduler.add(request)
    return requests


def _ids(batch: ScheduledBatch | None) -> tuple[bool, list[int]] | None:
    return None if batch is None else (batch.is_prefill, [r.req_id for r in batch.requests])


def _sample(batch: ScheduledBatch, token: int = 7) -> None:
    """What the runner does after a step: one new token for every scheduled request."""
    for request in batch.requests:
        request.output_token_ids.append(token)


def _check_blocks(scheduler: Scheduler, batch: ScheduledBatch | None) -> None:
    """Right after schedule(): running requests hold disjoint blocks, with room for every token
    this step writes (all tokens of a scheduled request; all but the newest, not yet written, of
    the others); waiting requests hold none; held + free = all blocks."""
    held = [b for r in scheduler.running for b in r.block_ids]
    assert len(held) == len(set(held))
    assert len(held) + scheduler.allocator.num_free == scheduler.allocator.num_blocks
    scheduled = batch.requests if batch else []
    for request in scheduler.running:
        num_written = request.num_tokens - (request not in scheduled)
        assert len(request.block_ids) >= -(-num_written // BLOCK)
    assert all(not r.block_ids for r in scheduler.waiting)


def test_admission_stops_at_max_num_seqs():
    scheduler = _scheduler(max_num_seqs=2)
    a = _add(scheduler, [3, 5, 2])[0]
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [0, 1])
    _sample(batch)
    batch = scheduler.schedule()
    assert _ids(batch) == (False, [0, 1])  # c waits: two are running
    _sample(batch)
    scheduler.finish(a, "length")
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [2])  # a's seat goes to c, prefill first
    assert [r.req_id for r in scheduler.running] == [1, 2] and not scheduler.waiting
    assert scheduler.log.joined_while_decoding == 1
    _check_blocks(scheduler, batch)


def test_admission_stops_at_max_num_batched_tokens():
    scheduler = _scheduler(max_num_batched_tokens=25)
    _add(scheduler, [10, 10, 10, 3])
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [0, 1])  # 10 + 10; a third would make 30 > 25
    assert sum(r.num_tokens for r in batch.requests) <= 25
    _sample(batch)
    assert _ids(scheduler.schedule()) == (True, [2, 3])  # admitted before anyone decodes
    assert scheduler.log.num_prefill_steps == 2 and scheduler.log.num_decode_steps == 0


def test_prompt_over_token_budget_admitted_alone():
    scheduler = _scheduler(max_num_batched_tokens=25)
    _add(scheduler, [30, 2])
    assert _ids(scheduler.schedule()) == (True, [0])
    assert _ids(scheduler.schedule()) == (True, [1])


def test_admission_waits_for_blocks_in_arrival_order():
    scheduler = _scheduler(num_blocks=4)
    _add(scheduler, [9, 8, 1])  # 3 blocks, then 2 (only 1 left), then 1
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [0])  # request 2 would fit but does not overtake request 1
    assert [r.req_id for r in scheduler.waiting] == [1, 2]
    assert scheduler.allocator.num_free == 1
    _check_blocks(scheduler, batch)


def test_preempts_newest_first_and_returns_their_blocks():
    scheduler = _scheduler(num_blocks=5)
    a, _, c, d = _add(scheduler, [7, 3, 3, 3])  # 2 + 1 + 1 + 1 blocks: the cache is full
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [0, 1, 2, 3]) and scheduler.allocator.num_free == 0
    _sample(batch)  # a 8, b 4, c 4, d 4 tokens: every block still has room
    batch = scheduler.schedule()
    assert _ids(batch) == (False, [0, 1, 2, 3]) and scheduler.log.num_preemptions == 0
    _sample(batch)  # a 9 and b 5 tokens: each needs one more block
    d_blocks = list(d.block_ids)
    batch = scheduler.schedule()
    assert _ids(batch) == (False, [0, 1]) and scheduler.log.num_preemptions == 2
    assert a.block_ids[-1] == d_blocks[0]  # d (the newest) went first; its block went to a
    assert [r.req_id for r in scheduler.waiting] == [2, 3]  # arrival order kept at the front
    for request in (c, d):
        assert request.status == Status.WAITING and request.num_preemptions == 1
        assert request.block_ids == [] and request.output_token_ids == [7, 7]
    assert scheduler.log.num_preemptions == 2
    assert scheduler.log.events == ["preempt 3 at 5 tokens", "preempt 2 at 5 tokens"]
    _check_blocks(scheduler, batch)


def test_preempted_request_recomputes_all_its_tokens():
    scheduler = _scheduler(num_blocks=5)
    a, b, _, _ = _add(scheduler, [7, 3, 3, 3])
    for _ in range(3):
        batch = scheduler.schedule()
        _sample(batch)
    scheduler.finish(a, "length")
    scheduler.finish(b, "stop")
    assert a.block_ids == [] and scheduler.allocator.num_free == 5  # everything came back
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [2, 3])
    assert [r.num_tokens for r in batch.requests] == [5, 5]  # prompt + the outputs so far
    assert [len(r.block_ids) for r in batch.requests] == [2, 2]
    _check_blocks(scheduler, batch)


def test_oldest_request_always_finishes():
    scheduler = _scheduler(num_blocks=4, max_model_len=16)
    a, b = _add(scheduler, [4, 4], max_tokens=12)
    for _ in range(5):  # prefill, then decode to 9 tokens each: all 4 blocks in use
        _sample(scheduler.schedule())
    assert a.num_tokens == b.num_tokens == 9 and scheduler.allocator.num_free == 0
    while a.num_tokens < 16:  # b gives way; it cannot come back (3 blocks) while a runs
        batch = scheduler.schedule()
        assert _ids(batch) == (False, [0])
        _check_blocks(scheduler, batch)
        _sample(batch)
    assert b.num_preemptions == 1 and a.num_preemptions == 0 and len(a.block_ids) == 4
    scheduler.finish(a, "length")
    batch = scheduler.schedule()
    assert _ids(batch) == (True, [1]) and len(b.block_ids) == 3
    _check_blocks(scheduler, batch)


def test_fits_alone_uses_prompt_plus_max_tokens_capped_by_max_model_len():
    scheduler = _scheduler(num_blocks=4, max_model_len=64)  # 16 tokens fit
    assert scheduler.fits_alone(Request(0, [1] * 8, SamplingParams(max_tokens=8)))
    assert not scheduler.fits_alone(Request(1, [1] * 8, SamplingParams(max_tokens=9)))
    capped = _scheduler(num_blocks=4, max_model_len=16)
    assert capped.max_tokens_of(Request(2, [1] * 8, SamplingParams(max_tokens=100))) == 16
    assert capped.fits_alone(Request(2, [1] * 8, SamplingParams(max_tokens=100)))


def test_nothing_to_schedule():
    scheduler = _scheduler()
    assert scheduler.schedule() is None and not scheduler.has_unfinished()


def _random_workload(seed: int, schedulers: list[Scheduler]) -> list[tuple]:
    """Feed every scheduler the same seeded random calls (arrivals, steps, early stops); check the
    invariants after each step; return the batches (is_prefill, req ids, block ids), which must
    be the same for all."""
    rng = random.Random(seed)
    trace = []
    for step in range(150):
        if rng.random() < 0.3:
            n, max_tokens = rng.randint(1, 20), rng.randint(1, 30)
            for s in schedulers:
                s.add(Request(step, [5] * n, SamplingParams(max_tokens=max_tokens)))
        batches = [s.schedule() for s in schedulers]
        if batches[0] is None:
            assert all(b is None for b in batches)
            continue
        keys = [(b.is_prefill, [r.req_id for r in b.requests],
                 [list(r.block_ids) for r in b.requests]) for b in batches]
        assert all(k == keys[0] for k in keys)
        trace.append(keys[0])
        stops = [rng.random() < 0.05 for _ in batches[0].requests]
        for s, batch in zip(schedulers, batches):
            _check_blocks(s, batch)
            assert len(s.running) <= s.max_num_seqs
            if batch.is_prefill and len(batch.requests) > 1:
                assert sum(r.num_tokens for r in batch.requests) <= s.max_num_batched_tokens
            _sample(batch)
            for request, stop in zip(batch.requests, stops):
                if stop or len(request.output_token_ids) >= request.params.max_tokens:
                    s.finish(request, "stop" if stop else "length")
    return trace


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_invariants_and_is_deterministic(seed):
    def make() -> Scheduler:
        return _scheduler(num_blocks=12, max_num_seqs=4, max_num_batched_tokens=40)

    schedulers = [make(), make()]
    trace = _random_workload(seed, schedulers)
    assert trace == _random_workload(seed, [make()])  # a fresh one, fed alone
    assert schedulers[0].log == schedulers[1].log
    assert schedulers[0].log.num_preemptions > 0 and schedulers[0].log.joined_while_decoding > 0
