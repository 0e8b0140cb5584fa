"""Where a decode step's time goes (GPU): per-step host/GPU split, kernel time per category
(MoE, attention, dense GEMM, collectives, other) and the top kernels, on any parallel layout.

    python3 benchmarks/step_profile.py [model=dsv2lite] [parallel.dcp=2] ...   (Hydra overrides)

Rank 0 prints: host time to schedule + fill the inputs, GPU time of the forward (CUDA events),
time of logits + sampling, the GPU idle share of a step, then torch.profiler's kernel time per
step by category (collectives = NCCL kernels: the per-step collective time) and its top kernels.
"""
from __future__ import annotations

import random
import sys
import time
from collections import defaultdict

import torch

from runner import build_runner, compose_config, launch
from runner.request import SamplingParams

NUM_TIMED_STEPS = 50
NUM_PROFILED_STEPS = 5
CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("collectives (NCCL)", ("nccl",)),
    ("MoE (routed experts)", ("moe", "align", "expert")),
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


def _time_steps(runner) -> str:
    """Median host prepare / GPU forward / the rest of a decode step."""
    host_prepare, gpu_forward, wall = [], [], []
    start_evt, end_evt = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(NUM_TIMED_STEPS):
        t0 = time.perf_counter()
        batch = runner.scheduler.schedule()
        num_padded = runner.graph.padded_size(len(batch.requests))
        runner.decode_buffers.fill(batch.requests, num_padded, runner.block_table)
        inputs = runner.decode_buffers.inputs(num_padded, runner.decode_buffers.max_local_seq_len)
        t1 = time.perf_counter()
        start_evt.record()
        hidden = runner.graph.replay(inputs)
        end_evt.record()
        tokens, logprobs = runner.sample(batch, runner.logits(batch, hidden, inputs))
        for request, token, logprob in zip(batch.requests, tokens, logprobs):
            runner.append_token(request, token, logprob)
        t2 = time.perf_counter()
        host_prepare.append((t1 - t0) * 1e3)
        gpu_forward.append(start_evt.elapsed_time(end_evt))
        wall.append((t2 - t0) * 1e3)
    step, forward = _median(wall), _median(gpu_forward)
    return (f"step {step:.2f} ms = prepare (host) {_median(host_prepare):.2f} + forward, logits, "
            f"sample and bookkeeping {step - _median(host_prepare):.2f}; forward on the GPU "
            f"{forward:.2f} ms; GPU idle ~{max(0.0, step - forward):.2f} ms per step")


def _profile_steps(runner) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(NUM_PROFILED_STEPS):
            runner.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_category, launches = defaultdict(float), 0
    for e in events:
        per_category[_category(e.key)] += e.device_time_total / 1e3 / NUM_PROFILED_STEPS
        launches += e.count
    lines = [f"kernel time per step by category ({launches / NUM_PROFILED_STEPS:.0f} kernels "
             "per step):"]
    for category, ms in sorted(per_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {category:<40} {ms:7.3f} ms")
    lines.append(f"  {'total':<40} {sum(per_category.values()):7.3f} ms")
    lines.append("top kernels (per step: calls, ms):")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:30]:
        lines.append(f"  {e.count / NUM_PROFILED_STEPS:6.0f} {e.device_time_total / 1e3 / NUM_PROFILED_STEPS:7.3f}"
                     f"  {e.key[:90]}")
    return "\n".join(lines)


def profile_rank(cfg, rank: int) -> str | None:
    runner = build_runner(cfg)
    rng = random.Random(0)
    for _ in range(cfg.scheduler.max_num_seqs):
        runner.add_request([rng.randrange(1000) for _ in range(2)],
                           SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(20):  # prefill + warm-up decode steps
        runner.step()
    try:
        timing = _time_steps(runner)
        kernels = _profile_steps(runner)
    finally:
        runner.shutdown()
    if not runner.plan.is_driver:
        return None
    return f"batch {cfg.scheduler.max_num_seqs}, {cfg.parallel}:\n{timing}\n{kernels}"


def main(overrides: list[str]) -> None:
    cfg = compose_config(["model=dsv2lite", "scheduler.max_num_seqs=128", *overrides])
    print(launch(cfg, profile_rank))


if __name__ == "__main__":
    main(sys.argv[1:])
