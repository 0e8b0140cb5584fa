"""Benchmark arithmetic and report: per-request timestamps -> the metrics and the printed table of
`vllm bench serve` (same key names, same definitions, same layout)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runner.errors import RunnerError

REPORT_WIDTH = 50
LATENCY_SECTIONS = (  # (key infix, row name, section header)
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
)


@dataclass
class RequestTiming:
    """One measured request (warm-ups are never passed in); times are perf_counter() seconds."""

    prompt_len: int
    start: float  # when the request was submitted (its arrival)
    token_times: list[float]  # when each output token was produced, in order
    success: bool = True
    error: str | None = None


def _check_timings(timings: list[RequestTiming], duration: float) -> None:
    if not duration > 0:
        raise RunnerError(f"bench duration: must be > 0 seconds, got {duration}")
    for req_index, timing in enumerate(timings):
        if not timing.success:
            continue
        times = timing.token_times
        if not times:
            raise RunnerError(
                f"timings[{req_index}].token_times: a successful request needs >= 1 token"
            )
        is_sorted = all(earlier <= later for earlier, later in zip(times, times[1:]))
        if times[0] < timing.start or not is_sorted:
            raise RunnerError(
                f"timings[{req_index}].token_times: must be non-decreasing and not before its start"
            )


def _stats_ms(name: str, values_s: list[float]) -> dict[str, float]:
    """mean/median/std/p99 of `values_s` (seconds) in ms; all 0.0 when empty, as vLLM reports."""
    values = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    return {
        f"mean_{name}_ms": float(np.mean(values)),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(np.std(values)),
        f"p99_{name}_ms": float(np.percentile(values, 99)),
    }


def _peaks(completed: list[RequestTiming]) -> tuple[float, int]:
    """(max output tokens in one 1-second bucket, max requests touching one bucket).

    Buckets count whole seconds since the earliest start; a request occupies every bucket from
    the one holding its start to the one holding its last token, both included (vLLM's rule, so
    two back-to-back requests inside one second count as 2).
    """
    if not completed:
        return 0.0, 0
    first_start = min(timing.start for timing in completed)
    last_end = max(timing.token_times[-1] for timing in completed)
    num_buckets = math.ceil(last_end - first_start) + 1
    tokens_per_bucket = np.zeros(num_buckets, dtype=np.int64)
    requests_per_bucket = np.zeros(num_buckets, dtype=np.int64)
    for timing in completed:
        for token_time in timing.token_times:
            tokens_per_bucket[int(token_time - first_start)] += 1
        first_bucket = int(timing.start - first_start)
        last_bucket = int(timing.token_times[-1] - first_start)
        requests_per_bucket[first_bucket : last_bucket + 1] += 1
    return float(tokens_per_bucket.max()), int(requests_per_bucket.max())


def compute_metrics(timings: list[RequestTiming], duration: float) -> dict:
    """vLLM's serving metrics (its `--save-result` key names) from per-request timestamps.

    Failed requests count in `failed` and the per-request lists only; `duration` (seconds) divides
    every throughput.
    """
    _check_timings(timings, duration)
    completed = [timing for timing in timings if timing.success]
    output_lens = [len(timing.token_times) if timing.success else 0 for timing in timings]
    ttfts = [t.token_times[0] - t.start if t.token_times else 0.0 for t in timings]
    itls = [[later - earlier for earlier, later in zip(t.token_times, t.token_times[1:])]
            for t in timings]

    completed_ttfts = [timing.token_times[0] - timing.start for timing in completed]
    completed_itls = [gap for timing, gaps in zip(timings, itls) if timing.success for gap in gaps]
    tpots = [
        (timing.token_times[-1] - timing.token_times[0]) / (len(timing.token_times) - 1)
        for timing in completed
        if len(timing.token_times) > 1
    ]
    total_input_tokens = sum(timing.prompt_len for timing in completed)
    total_output_tokens = sum(output_lens)
    max_output_tokens_per_s, max_concurrent_requests = _peaks(completed)

    return {
        "duration": duration,
        "completed": len(completed),
        "failed": len(timings) - len(completed),
        "total_input_tokens": total_input_tokens,
        "total_output_tokens": total_output_tokens,
        "request_throughput": len(completed) / duration,
        "output_throughput": total_output_tokens / duration,
        "total_token_throughput": (total_input_tokens + total_output_tokens) / duration,
        "input_lens": [timing.prompt_len for timing in timings],
        "output_lens": output_lens,
        "ttfts": ttfts,
        "itls": itls,
        "errors": [timing.error for timing in timings],
        "max_output_tokens_per_s": max_output_tokens_per_s,
        "max_concurrent_requests": max_concurrent_requests,
        **_stats_ms("ttft", completed_ttfts),
        **_stats_ms("tpot", tpots),
        **_stats_ms("itl", completed_itls),
    }


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def format_report(metrics: dict, title: str = "Serving Benchmark Result") -> str:
    """The table `vllm bench serve` prints, from `compute_metrics`' dict.

    Optional keys `max_concurrency` (int or None) and `request_rate` (float or "inf"), as in
    vLLM's result JSON, add the rows vLLM prints for them.
    """
    lines = [f"{' ' + title + ' ':=^{REPORT_WIDTH}}"]
    lines.append(_row("Successful requests:", metrics["completed"]))
    lines.append(_row("Failed requests:", metrics["failed"]))
    if metrics.get("max_concurrency") is not None:
        lines.append(_row("Maximum request concurrency:", metrics["max_concurrency"]))
    request_rate = metrics.get("request_rate")
    if request_rate not in (None, "inf") and float(request_rate) != math.inf:
        lines.append(_row("Request rate configured (RPS):", float(request_rate)))
    lines += [
        _row("Benchmark duration (s):", float(metrics["duration"])),
        _row("Total input tokens:", metrics["total_input_tokens"]),
        _row("Total generated tokens:", metrics["total_output_tokens"]),
        _row("Request throughput (req/s):", float(metrics["request_throughput"])),
        _row("Output token throughput (tok/s):", float(metrics["output_throughput"])),
        _row("Peak output token throughput (tok/s):", float(metrics["max_output_tokens_per_s"])),
        _row("Peak concurrent requests:", float(metrics["max_concurrent_requests"])),
        _row("Total token throughput (tok/s):", float(metrics["total_token_throughput"])),
    ]
    for name, row_name, header in LATENCY_SECTIONS:
        lines.append(f"{header:-^{REPORT_WIDTH}}")
        lines.append(_row(f"Mean {row_name} (ms):", float(metrics[f"mean_{name}_ms"])))
        lines.append(_row(f"Median {row_name} (ms):", float(metrics[f"median_{name}_ms"])))
        lines.append(_row(f"P99 {row_name} (ms):", float(metrics[f"p99_{name}_ms"])))
    lines.append("=" * REPORT_WIDTH)
    return "\n".join(lines)
