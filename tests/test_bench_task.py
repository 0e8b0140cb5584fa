"""`cli.py task=bench` end to end: vLLM's report rows, bench.json with vLLM's key names, and
arithmetic that holds between them (totals, throughput x duration, the latency statistics
recomputed here from the per-request lists), arrival rate, concurrency limit and warm-ups.

The four runs start together (two at a time) in subprocesses without TRITON_INTERPRET.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import REPORT_ROWS, assert_latency_stats

CLI = Path(__file__).resolve().parent.parent / "cli.py"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 8, 16, 32
BENCH = ["task=bench", f"task.num_prompts={NUM_PROMPTS}", f"task.input_len={INPUT_LEN}",
         f"task.output_len={OUTPUT_LEN}"]
RUNS = {"default": [], "rate": ["task.request_rate=50"], "concurrency": ["task.max_concurrency=2"],
        "warmups": ["task.num_warmups=3"]}
LIST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "errors")


def _run_bench(workdir: Path, overrides: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # two runs share two cores
    run_dir = workdir / "run"
    workdir.mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(CLI), *BENCH, *overrides, "print_config=false",
                           f"hydra.run.dir={run_dir}"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, run_dir / "bench.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> (the finished process, the path of its bench.json)."""
    root = tmp_path_factory.mktemp("bench")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run_bench, root / name, overrides)
                   for name, overrides in RUNS.items()}
        return {name: future.result() for name, future in futures.items()}


def _result(runs, name: str) -> tuple[str, dict]:
    """(stdout, bench.json) of a run that must have succeeded."""
    proc, path = runs[name]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout, json.loads(path.read_text())


def _e2e_seconds(metrics: dict) -> list[float]:
    """Per request: submission to last token (TTFT plus every inter-token gap)."""
    return [ttft + sum(gaps) for ttft, gaps in zip(metrics["ttfts"], metrics["itls"])]


def _check_consistent(metrics: dict) -> None:
    """What must hold in every run of NUM_PROMPTS successful requests with ignore_eos."""
    assert metrics["completed"] == NUM_PROMPTS and metrics["failed"] == 0
    assert all(len(metrics[key]) == NUM_PROMPTS for key in LIST_KEYS)
    assert metrics["input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert metrics["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert metrics["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert metrics["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN  # ignore_eos defaults true
    duration = metrics["duration"]
    assert duration > 0
    assert metrics["output_throughput"] * duration == pytest.approx(NUM_PROMPTS * OUTPUT_LEN)
    assert metrics["request_throughput"] * duration == pytest.approx(NUM_PROMPTS)
    assert metrics["total_token_throughput"] * duration == pytest.approx(
        NUM_PROMPTS * (INPUT_LEN + OUTPUT_LEN))
    assert all(len(gaps) == OUTPUT_LEN - 1 for gaps in metrics["itls"])
    assert all(t >= 0 for t in metrics["ttfts"])
    assert all(gap >= 0 for gaps in metrics["itls"] for gap in gaps)
    assert max(_e2e_seconds(metrics)) <= duration * (1 + 1e-9)
    # the statistics, recomputed in ms from the per-request lists
    gaps = [gap for request_gaps in metrics["itls"] for gap in request_gaps]
    tpots = [sum(request_gaps) / (OUTPUT_LEN - 1) for request_gaps in metrics["itls"]]
    for name, values in (("ttft", metrics["ttfts"]), ("tpot", tpots), ("itl", gaps)):
        assert_latency_stats(metrics, name, [v * 1000 for v in values])
    # peak tokens in one 1-second bucket: at least the average over the buckets the run spans
    peak = metrics["max_output_tokens_per_s"]
    total = metrics["total_output_tokens"]
    assert total / (math.ceil(duration) + 1) <= peak <= total
    # vLLM's rule: a request counts in every 1-second bucket from its start to its last token
    assert 1 <= metrics["max_concurrent_requests"] <= NUM_PROMPTS
    if duration < 1:
        assert metrics["max_concurrent_requests"] == NUM_PROMPTS


def _printed_rows(stdout: str) -> dict[str, str]:
    rows = {}
    for label in REPORT_ROWS:
        found = re.findall(rf"^{re.escape(label)} +(\S+) *$", stdout, flags=re.MULTILINE)
        assert len(found) == 1, (label, stdout)
        rows[label] = found[0]
    return rows


@pytest.mark.parametrize("name", RUNS)
def test_report_rows_match_bench_json(runs, name):
    stdout, metrics = _result(runs, name)
    assert "Serving Benchmark Result" in stdout
    for label, value in _printed_rows(stdout).items():
        expected = metrics[REPORT_ROWS[label]]
        if isinstance(expected, int) and label != "Peak concurrent requests:":
            assert value == str(expected), label
        else:
            assert value == f"{expected:.2f}", label


@pytest.mark.parametrize("name", RUNS)
def test_bench_json_arithmetic(runs, name):
    _check_consistent(_result(runs, name)[1])


def test_request_rate_is_reported(runs):
    stdout, metrics = _result(runs, "rate")
    assert metrics["request_rate"] == 50
    assert re.search(r"^Request rate configured \(RPS\): +50\.00 *$", stdout, flags=re.MULTILINE)
    assert "Request rate configured" not in _result(runs, "default")[0]  # inf: no such row


def test_max_concurrency_is_respected(runs):
    """At most 2 requests in flight: their in-flight times sum to at most 2 x the duration.
    vLLM's 'Peak concurrent requests' counts every request touching a 1-second bucket, so on a
    sub-second run it shows all of them even with the limit; it bounds nothing here."""
    stdout, limited = _result(runs, "concurrency")
    assert limited["max_concurrency"] == 2
    assert re.search(r"^Maximum request concurrency: +2 *$", stdout, flags=re.MULTILINE)
    assert sum(_e2e_seconds(limited)) <= 2 * limited["duration"] * (1 + 1e-9)
    unlimited = _result(runs, "default")[1]  # all 8 at once: the same bound fails
    assert sum(_e2e_seconds(unlimited)) > 2 * unlimited["duration"]


def test_warmups_are_not_counted(runs):
    _, metrics = _result(runs, "warmups")
    assert metrics["num_warmups"] == 3
    assert metrics["completed"] == NUM_PROMPTS and len(metrics["ttfts"]) == NUM_PROMPTS
    assert metrics["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_bench_json_is_strict_json_with_vllm_inf(runs):
    _, path = runs["default"]
    metrics = json.loads(path.read_text(), parse_constant=_refuse_constant)
    assert metrics["request_rate"] == "inf"


def test_floor_batch_is_what_the_kv_cache_holds():
    """The bandwidth floor is computed for the requests that can be in flight at once: a KV
    cache of 128 tokens holds 4 requests of 16 + 16 tokens, whatever max_num_seqs says."""
    from runner import build_runner, compose_config
    from runner.tasks.bench import BenchTask

    runner = build_runner(compose_config(["device=cpu", "block_table.num_blocks=8",
                                          "block_table.block_size=16",
                                          "model.max_model_len=128", "scheduler.max_num_seqs=64"]))
    task = BenchTask(num_prompts=10, input_len=16, output_len=16)
    assert task._context(runner)["floor_batch"] == 4
    assert BenchTask(num_prompts=3, input_len=16, output_len=16)._context(runner)[
        "floor_batch"] == 3
