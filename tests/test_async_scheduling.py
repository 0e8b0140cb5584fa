"""Async scheduling (decode step N+1 launched before step N's tokens are read) gives exactly
the outputs, finish reasons and token events of the synchronous runner: with EOS stops, length
limits, max_model_len, arrivals during decode, preemption and sampled requests mixed in."""
import pytest

from runner import build_runner, compose_config
from runner.request import SamplingParams

BASE = ["model=tiny", "model.dtype=float32", "device=cpu", "scheduler.max_num_seqs=6"]
PROMPTS = [list(range(1, n + 1)) for n in (3, 17, 40, 5, 64, 9)]


def _runner(async_scheduling: bool, *overrides):
    return build_runner(compose_config(
        [*BASE, f"scheduler.async_scheduling={async_scheduling}", *overrides]))


def _run(runner, jobs, eos=None, arrivals=()):
    """jobs: (prompt, params); arrivals: (step index, prompt, params) added between steps.
    -> outputs per request and the token events per request, in order."""
    if eos is not None:
        runner.eos_token_ids = {eos}
    ids = [runner.add_request(p, params) for p, params in jobs]
    pending, events, step = list(arrivals), {}, 0
    while runner.has_unfinished() or pending:
        for arrival in [a for a in pending if a[0] == step]:
            ids.append(runner.add_request(arrival[1], arrival[2]))
            pending.remove(arrival)
        for e in runner.step():
            events.setdefault(e.req_id, []).append((e.token_id, e.finished, e.finish_reason))
        step += 1
    outputs = [runner.output(i) for i in ids]
    return [(o.token_ids, o.finish_reason) for o in outputs], [events[i] for i in ids], outputs


def _compare(jobs, *overrides, eos=None, arrivals=()):
    sync_runner, async_runner = _runner(False, *overrides), _runner(True, *overrides)
    expected, expected_events, sync_out = _run(sync_runner, jobs, eos, arrivals)
    got, got_events, async_out = _run(async_runner, jobs, eos, arrivals)
    assert got == expected
    assert got_events == expected_events
    for s, a in zip(sync_out, async_out):
        assert s.token_ids == a.token_ids
    for req_id in async_runner.requests:  # every token and logprob read back
        r, ref = async_runner.requests[req_id], sync_runner.requests[req_id]
        assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert -1 not in r.output_token_ids
    return async_runner, expected


def test_same_outputs_with_different_lengths_and_overlap_happens():
    jobs = [(p, SamplingParams(max_tokens=m)) for p, m in zip(PROMPTS, (1, 2, 9, 16, 5, 12))]
    runner, _ = _compare(jobs)
    assert runner.async_decode.num_overlapped > 0


def test_same_outputs_when_requests_stop_at_eos():
    greedy, _, _ = _run(_runner(False), [(p, SamplingParams(max_tokens=12)) for p in PROMPTS])
    eos = greedy[2][0][4]  # a token some request emits mid-way: it now stops there
    jobs = [(p, SamplingParams(max_tokens=12)) for p in PROMPTS]
    _, outputs = _compare(jobs, eos=eos)
    assert any(reason == "stop" for _, reason in outputs)
    assert outputs[2][0][-1] == eos and len(outputs[2][0]) <= 5


def test_same_outputs_with_arrivals_during_decode_and_max_model_len():
    jobs = [(p, SamplingParams(max_tokens=30)) for p in PROMPTS[:3]]
    arrivals = [(3, PROMPTS[3], SamplingParams(max_tokens=7)),
                (6, PROMPTS[4], SamplingParams(max_tokens=20)),
                (6, PROMPTS[5], SamplingParams(max_tokens=3))]
    _, outputs = _compare(jobs, "model.max_model_len=72", arrivals=arrivals)
    assert outputs[4][1] == "length" and len(PROMPTS[4]) + len(outputs[4][0]) == 72


def test_same_outputs_under_preemption():
    jobs = [(p, SamplingParams(max_tokens=24)) for p in PROMPTS]
    runner, _ = _compare(jobs, "block_table.num_blocks=14", "model.max_model_len=96")
    assert runner.scheduler.log.num_preemptions > 0


def test_sampled_requests_mixed_with_greedy_ones():
    jobs = [(p, SamplingParams(max_tokens=8, temperature=0.8 if i % 2 else 0.0, seed=3))
            for i, p in enumerate(PROMPTS)]
    _compare(jobs)
