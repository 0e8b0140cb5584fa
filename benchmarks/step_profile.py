"""Where a decode step's time goes (GPU): per-step host/GPU split, kernel time per category
(MoE, attention, dense GEMM, collectives, other) and the top kernels, on any parallel layout.

    python3 benchmarks/step_profile.py [--prompt-len 2] [model=dsv2lite] [parallel.dcp=2] ...
    (Hydra overrides after the options; batch = scheduler.max_num_seqs, default 128)

Contexts run from the prompt length + 10 to + 65 tokens (10 warm-up, 50 timed and 5 profiled
decode steps): the seed bench (prompts of 2, 512 out) averages ~258, i.e. `--prompt-len 230`.

Rank 0 prints: the median decode step, kernel time per step and the GPU idle rest, then
torch.profiler's kernel time per step by category (collectives = NCCL kernels: the per-step
collective time) and its top kernels.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict

import torch

from runner import build_runner, compose_config, launch
from runner.request import SamplingParams

NUM_WARM_UP_STEPS = 10
NUM_TIMED_STEPS = 50
NUM_PROFILED_STEPS = 5
CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("collectives (NCCL)", ("nccl",)),
    ("MoE (routed experts)", ("moe", "bucket", "gate_up", "_down_kernel", "sum_choices")),
    ("attention decode", ("paged", "decode", "merge")),
    ("dense GEMM", ("gemm", "nvjet", "cutlass", "sm90", "cublas", "splitk")),
)


def _category(name: str) -> str:
    lowered = name.lower()
    for category, keys in CATEGORIES:
        if any(k in lowered for k in keys):
            return category
    return "other (norms, rotary, copies, sampler)"


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _time_steps(runner) -> float:
    """Median wall time of a decode step (`runner.step()`, async scheduling as configured)."""
    wall = []
    for _ in range(NUM_TIMED_STEPS):
        t0 = time.perf_counter()
        runner.step()
        wall.append((time.perf_counter() - t0) * 1e3)
    return _median(wall)


def _busy_ms(kernels: list[dict]) -> float:
    """GPU time covered by at least one kernel (the union of their intervals), in ms."""
    busy, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k["ts"]):
        start, stop = k["ts"], k["ts"] + k["dur"]
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e3


def _layer_timeline(kernels: list[dict]) -> list[str]:
    """One decoder layer in the middle of a step, kernel by kernel in start order: offset from the
    layer's first kernel, duration, stream, and the GPU idle time before it (us)."""
    kernels = sorted(kernels, key=lambda k: k["ts"])
    marks = [i for i, k in enumerate(kernels) if "norm_rope" in k["name"]]
    if len(marks) < 12:
        return []
    first, last = marks[len(marks) // 2], marks[len(marks) // 2 + 1]
    t0, end = kernels[first]["ts"], kernels[first - 1]["ts"] + kernels[first - 1]["dur"]
    lines = ["one layer (us: start, duration, idle before, stream, kernel):"]
    for k in kernels[first:last]:
        lines.append(f"  {k['ts'] - t0:7.1f} {k['dur']:6.1f} {max(0.0, k['ts'] - end):5.1f} "
                     f"{k['tid']!s:>3} {k['name'][:80]}")
        end = max(end, k["ts"] + k["dur"])
    return lines


def _trace_kernels(prof) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace_file:
            trace = json.load(trace_file)
    return [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]


def _profile_steps(runner) -> tuple[dict[str, float], float, list[str]]:
    """Kernel ms per step by category, kernels per step, the top-kernel lines (with the GPU's busy
    time per step and one layer's timeline)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(NUM_PROFILED_STEPS):
            runner.step()
        torch.cuda.synchronize()
    kernels = _trace_kernels(prof)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_category, launches = defaultdict(float), 0
    for e in events:
        per_category[_category(e.key)] += e.device_time_total / 1e3 / NUM_PROFILED_STEPS
        launches += e.count
    top = [f"  {e.count / NUM_PROFILED_STEPS:6.0f} "
           f"{e.device_time_total / 1e3 / NUM_PROFILED_STEPS:7.3f}  {e.key[:90]}"
           for e in sorted(events, key=lambda e: -e.device_time_total)[:30]]
    busy = [f"GPU busy (union of kernels) {_busy_ms(kernels) / NUM_PROFILED_STEPS:.2f} ms per step"]
    return per_category, launches / NUM_PROFILED_STEPS, top + busy + _layer_timeline(kernels)


def _report(wall: float, per_category: dict[str, float], num_kernels: float,
            top: list[str]) -> str:
    gpu = sum(per_category.values())
    lines = [f"step {wall:.2f} ms (median of {NUM_TIMED_STEPS}); kernels {gpu:.2f} ms per step "
             f"({num_kernels:.0f} kernels); GPU idle ~{max(0.0, wall - gpu):.2f} ms per step",
             "kernel time per step by category:"]
    for category, ms in sorted(per_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {category:<40} {ms:7.3f} ms")
    lines.append("top kernels (per step: calls, ms):")
    return "\n".join(lines + top)


def profile_rank(cfg, rank: int, prompt_len: int) -> str | None:
    runner = build_runner(cfg)
    rng = random.Random(0)
    for _ in range(cfg.scheduler.max_num_seqs):
        runner.add_request([rng.randrange(1000) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=400, ignore_eos=True))
    runner.step()
    while runner.last_step_was_prefill:  # every prompt in, then a few warm-up decode steps
        runner.step()
    for _ in range(NUM_WARM_UP_STEPS):
        runner.step()
    try:
        report = _report(_time_steps(runner), *_profile_steps(runner))
    finally:
        runner.shutdown()
    if not runner.plan.is_driver:
        return None
    first_context = prompt_len + NUM_WARM_UP_STEPS
    last_context = first_context + NUM_TIMED_STEPS + NUM_PROFILED_STEPS
    return (f"batch {cfg.scheduler.max_num_seqs}, prompts of {prompt_len} tokens (contexts "
            f"{first_context}-{last_context}), {cfg.parallel}:\n{report}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    cfg = compose_config(["model=dsv2lite", "scheduler.max_num_seqs=128", *overrides])
    print(launch(cfg, profile_rank, args.prompt_len))


if __name__ == "__main__":
    main(sys.argv[1:])
