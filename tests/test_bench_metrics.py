"""bench_metrics against hand-computed answers, pure-Python statistics and the seed's report."""
from __future__ import annotations

import math
import random

import pytest

from helpers import REPORT_ROWS, assert_latency_stats
from runner.errors import RunnerError
from runner.tasks.bench_metrics import RequestTiming, compute_metrics, format_report

BASE = 1000.5  # a perf_counter-like origin that is not a whole second

# The V2 report of `vllm bench serve` in the seed (PR 34179), trailing spaces included.
SEED_REPORT = """\
============ Serving Benchmark Result ============
Successful requests:                     128       
Failed requests:                         0         
Benchmark duration (s):                  5.84      
Total input tokens:                      128       
Total generated tokens:                  65536     
Request throughput (req/s):              21.90     
Output token throughput (tok/s):         11214.20  
Peak output token throughput (tok/s):    11648.00  
Peak concurrent requests:                128.00    
Total token throughput (tok/s):          11236.10  
---------------Time to First Token----------------
Mean TTFT (ms):                          187.06    
Median TTFT (ms):                        188.50    
P99 TTFT (ms):                           200.01    
-----Time per Output Token (excl. 1st token)------
Mean TPOT (ms):                          11.04     
Median TPOT (ms):                        11.04     
P99 TPOT (ms):                           11.14     
---------------Inter-token Latency----------------
Mean ITL (ms):                           11.04     
Median ITL (ms):                         11.00     
P99 ITL (ms):                            12.88     
=================================================="""

SEED_METRICS = {
    "completed": 128, "failed": 0, "duration": 5.84, "total_input_tokens": 128,
    "total_output_tokens": 65536, "request_throughput": 21.90, "output_throughput": 11214.20,
    "max_output_tokens_per_s": 11648.0, "max_concurrent_requests": 128,
    "total_token_throughput": 11236.10,
    "mean_ttft_ms": 187.06, "median_ttft_ms": 188.50, "p99_ttft_ms": 200.01,
    "mean_tpot_ms": 11.04, "median_tpot_ms": 11.04, "p99_tpot_ms": 11.14,
    "mean_itl_ms": 11.04, "median_itl_ms": 11.00, "p99_itl_ms": 12.88,
}


def _timing(prompt_len, start, token_offsets, **kwargs) -> RequestTiming:
    return RequestTiming(prompt_len, BASE + start, [BASE + t for t in token_offsets], **kwargs)


def _two_requests() -> list[RequestTiming]:
    # A: ttft 0.125, gaps 0.25 0.25 0.5, tpot 1/3.  B: ttft 0.25, gaps 0.25 1.5, tpot 0.875.
    return [
        _timing(3, 0.0, [0.125, 0.375, 0.625, 1.125]),
        _timing(5, 0.5, [0.75, 1.0, 2.5]),
    ]


def test_two_requests_every_field():
    metrics = compute_metrics(_two_requests(), duration=2.5)
    assert metrics["duration"] == 2.5
    assert (metrics["completed"], metrics["failed"]) == (2, 0)
    assert (metrics["total_input_tokens"], metrics["total_output_tokens"]) == (8, 7)
    assert metrics["request_throughput"] == pytest.approx(0.8)
    assert metrics["output_throughput"] == pytest.approx(2.8)
    assert metrics["total_token_throughput"] == pytest.approx(6.0)
    assert metrics["input_lens"] == [3, 5]
    assert metrics["output_lens"] == [4, 3]
    assert metrics["ttfts"] == pytest.approx([0.125, 0.25])
    assert metrics["itls"][0] == pytest.approx([0.25, 0.25, 0.5])
    assert metrics["itls"][1] == pytest.approx([0.25, 1.5])
    assert metrics["errors"] == [None, None]
    # Buckets since the first start: second 0 holds 4 tokens, second 1 two, second 2 one.
    assert metrics["max_output_tokens_per_s"] == 4.0
    assert metrics["max_concurrent_requests"] == 2

    assert metrics["mean_ttft_ms"] == pytest.approx(187.5)
    assert metrics["median_ttft_ms"] == pytest.approx(187.5)
    assert metrics["std_ttft_ms"] == pytest.approx(62.5)
    assert metrics["p99_ttft_ms"] == pytest.approx(125 + 0.99 * 125)

    tpot_a, tpot_b = 1000 / 3, 875.0
    assert metrics["mean_tpot_ms"] == pytest.approx((tpot_a + tpot_b) / 2)
    assert metrics["median_tpot_ms"] == pytest.approx((tpot_a + tpot_b) / 2)
    assert metrics["std_tpot_ms"] == pytest.approx((tpot_b - tpot_a) / 2)
    assert metrics["p99_tpot_ms"] == pytest.approx(tpot_a + 0.99 * (tpot_b - tpot_a))

    # Pooled gaps [250, 250, 250, 500, 1500] ms.
    assert metrics["mean_itl_ms"] == pytest.approx(550.0)
    assert metrics["median_itl_ms"] == pytest.approx(250.0)
    assert metrics["std_itl_ms"] == pytest.approx(math.sqrt(235000.0))
    assert metrics["p99_itl_ms"] == pytest.approx(500 + 0.96 * 1000)


def test_failed_request_is_excluded():
    timings = _two_requests() + [_timing(100, 0.1, [0.2], success=False, error="boom")]
    metrics = compute_metrics(timings, duration=2.5)
    reference = compute_metrics(_two_requests(), duration=2.5)
    assert (metrics["completed"], metrics["failed"]) == (2, 1)
    assert metrics["input_lens"] == [3, 5, 100]
    assert metrics["output_lens"] == [4, 3, 0]
    assert metrics["errors"] == [None, None, "boom"]
    for key in ("total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
                "max_concurrent_requests", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "mean_itl_ms", "p99_itl_ms"):
        assert metrics[key] == reference[key], key


def test_single_token_requests_have_no_tpot():
    timings = [_timing(2, 0.0, [0.25]), _timing(2, 0.0, [0.75])]
    metrics = compute_metrics(timings, duration=1.0)
    for stat in ("mean", "median", "std", "p99"):
        assert metrics[f"{stat}_tpot_ms"] == 0.0
        assert metrics[f"{stat}_itl_ms"] == 0.0
    assert metrics["mean_ttft_ms"] == pytest.approx(500.0)
    assert metrics["itls"] == [[], []]

    # A single-token request next to a longer one leaves the TPOT list to the longer one.
    mixed = compute_metrics([_timing(2, 0.0, [0.25]), _timing(2, 0.0, [0.5, 0.75, 1.0])], 1.0)
    assert mixed["mean_tpot_ms"] == pytest.approx(250.0)
    assert mixed["std_tpot_ms"] == 0.0


def test_equal_gaps_tpot_equals_mean_itl():
    metrics = compute_metrics([_timing(1, 0.0, [0.5 + 0.0625 * i for i in range(9)])], 1.0)
    assert metrics["mean_tpot_ms"] == pytest.approx(metrics["mean_itl_ms"])
    assert metrics["mean_tpot_ms"] == pytest.approx(62.5)


def test_peak_concurrency_counts_whole_seconds_touched():
    # vLLM's bucket rule: a request occupies every second from its start's to its last token's.
    back_to_back = [_timing(1, 0.0, [0.25, 0.5]), _timing(1, 0.5, [0.75, 0.9])]
    assert compute_metrics(back_to_back, 1.0)["max_concurrent_requests"] == 2
    apart = [_timing(1, 0.0, [0.25, 0.5]), _timing(1, 1.25, [1.5, 1.75])]
    assert compute_metrics(apart, 2.0)["max_concurrent_requests"] == 1
    long_and_short = [_timing(1, 0.0, [3.5]), _timing(1, 2.1, [2.2]), _timing(1, 2.3, [2.4])]
    assert compute_metrics(long_and_short, 4.0)["max_concurrent_requests"] == 3


def _random_timings(rng: random.Random, num_requests: int) -> list[RequestTiming]:
    timings = []
    for _ in range(num_requests):
        start = rng.uniform(0.0, 3.0)
        times = [start + rng.uniform(0.0, 0.5)]
        for _ in range(rng.randint(0, 12)):
            times.append(times[-1] + rng.expovariate(10.0))
        timings.append(_timing(rng.randint(1, 64), start, times, success=rng.random() > 0.15))
    return timings


@pytest.mark.parametrize("seed", range(5))
def test_random_timings_against_brute_force(seed):
    rng = random.Random(seed)
    timings = _random_timings(rng, 40)
    duration = 6.0
    metrics = compute_metrics(timings, duration)
    completed = [t for t in timings if t.success]

    num_output = sum(len(t.token_times) for t in completed)
    assert metrics["total_output_tokens"] == num_output
    assert metrics["output_throughput"] * duration == pytest.approx(num_output)
    assert metrics["request_throughput"] * duration == pytest.approx(len(completed))
    assert metrics["total_token_throughput"] * duration == pytest.approx(
        num_output + sum(t.prompt_len for t in completed))

    assert_latency_stats(metrics, "ttft", [(t.token_times[0] - t.start) * 1000 for t in completed])
    assert_latency_stats(metrics, "tpot", [
        (t.token_times[-1] - t.token_times[0]) * 1000 / (len(t.token_times) - 1)
        for t in completed if len(t.token_times) > 1
    ])
    assert_latency_stats(metrics, "itl", [(b - a) * 1000 for t in completed
                                  for a, b in zip(t.token_times, t.token_times[1:])])

    origin = min(t.start for t in completed)
    num_seconds = math.ceil(max(t.token_times[-1] for t in completed) - origin) + 1
    tokens_in = [sum(k <= tt - origin < k + 1 for t in completed for tt in t.token_times)
                 for k in range(num_seconds)]
    in_flight = [
        sum(t.start - origin < k + 1 and t.token_times[-1] - origin >= k for t in completed)
        for k in range(num_seconds)
    ]
    assert metrics["max_output_tokens_per_s"] == max(tokens_in)
    assert metrics["max_concurrent_requests"] == max(in_flight)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(RunnerError, match="duration"):
        compute_metrics(_two_requests(), duration=0.0)
    with pytest.raises(RunnerError, match=r"timings\[0\].token_times"):
        compute_metrics([_timing(1, 0.0, [])], duration=1.0)
    with pytest.raises(RunnerError, match=r"timings\[1\].token_times"):
        compute_metrics([_timing(1, 0.0, [0.5]), _timing(1, 0.0, [0.5, 0.25])], duration=1.0)
    # A failed request may have produced nothing.
    assert compute_metrics([_timing(1, 0.0, [], success=False)], 1.0)["failed"] == 1


def test_report_reproduces_the_seed_exactly():
    assert format_report(SEED_METRICS) == SEED_REPORT


def _parse_report(report: str) -> dict[str, str]:
    rows = {}
    for line in report.splitlines():
        if line.startswith(("=", "-")):
            continue
        rows[line[:40].strip()] = line[41:].strip()
    return rows


def test_report_parses_back_to_the_numbers():
    metrics = compute_metrics(_two_requests(), duration=2.5)
    report = format_report(metrics)
    rows = _parse_report(report)
    assert list(rows) == list(_parse_report(SEED_REPORT))
    assert set(rows) == set(REPORT_ROWS)
    assert report.splitlines()[0] == SEED_REPORT.splitlines()[0]
    assert all(len(line) == 50 for line in report.splitlines() if line.startswith(("=", "-")))
    assert rows["Successful requests:"] == "2"
    assert rows["Failed requests:"] == "0"
    assert rows["Total input tokens:"] == "8"
    assert rows["Total generated tokens:"] == "7"
    assert rows["Benchmark duration (s):"] == "2.50"
    assert rows["Request throughput (req/s):"] == "0.80"
    assert rows["Output token throughput (tok/s):"] == "2.80"
    assert rows["Peak output token throughput (tok/s):"] == "4.00"
    assert rows["Peak concurrent requests:"] == "2.00"
    assert rows["Total token throughput (tok/s):"] == "6.00"
    assert rows["Mean TTFT (ms):"] == "187.50"
    assert rows["P99 TTFT (ms):"] == "248.75"
    assert rows["Median TPOT (ms):"] == "604.17"
    assert rows["P99 TPOT (ms):"] == "869.58"
    assert rows["Mean ITL (ms):"] == "550.00"
    assert rows["Median ITL (ms):"] == "250.00"
    assert rows["P99 ITL (ms):"] == "1460.00"
    for label, key in REPORT_ROWS.items():
        assert float(rows[label]) == pytest.approx(metrics[key], abs=0.005), label


def test_report_optional_rows_and_title():
    configured = {**SEED_METRICS, "max_concurrency": 16, "request_rate": 4.0}
    report = format_report(configured, title="DCP4")
    lines = report.splitlines()
    assert lines[0] == "====================== DCP4 ======================"
    assert lines[3] == "Maximum request concurrency:             16        "
    assert lines[4] == "Request rate configured (RPS):           4.00      "
    unlimited = format_report({**SEED_METRICS, "max_concurrency": None, "request_rate": "inf"})
    assert unlimited == SEED_REPORT
