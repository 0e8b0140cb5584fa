"""Where a decode step's time goes (GPU): per-step host/GPU split and the top kernels.

    python3 benchmarks/step_profile.py [model=dsv2lite] [graph=cuda] ...   (Hydra overrides)

Prints: host time to schedule + fill the inputs, GPU time of the forward (CUDA events), time of
logits + sampling, the GPU idle share of a step, then torch.profiler's top kernels of a few steps.
"""
from __future__ import annotations

import random
import sys
import time

import torch

from runner import build_runner, compose_config
from runner.request import SamplingParams


def main(overrides: list[str]) -> None:
    cfg = compose_config(["model=dsv2lite", "scheduler.max_num_seqs=128", *overrides])
    runner = build_runner(cfg)
    rng = random.Random(0)
    batch = cfg.scheduler.max_num_seqs
    for _ in range(batch):
        runner.add_request([rng.randrange(1000) for _ in range(2)],
                           SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(20):  # prefill + warm-up decode steps
        runner.step()
    host_prepare, gpu_forward, host_sample, wall = [], [], [], []
    start_evt, end_evt = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(50):
        t0 = time.perf_counter()
        sched = runner.scheduler.schedule()
        n = len(sched.requests)
        num_padded = runner.graph.padded_size(n)
        runner.decode_buffers.fill(sched.requests, num_padded, runner.block_table)
        inputs = runner.decode_buffers.inputs(num_padded, runner.decode_buffers.max_local_seq_len)
        t1 = time.perf_counter()
        start_evt.record()
        hidden = runner.graph.replay(inputs)
        end_evt.record()
        logits = runner.model.compute_logits(hidden[inputs.logits_indices[:n]])
        from runner.sampler import sample
        tokens, logprobs = sample(logits, [r.params for r in sched.requests],
                                  [r.sample_key for r in sched.requests],
                                  [len(r.output_token_ids) for r in sched.requests])
        for r, t, lp in zip(sched.requests, tokens, logprobs):
            runner._append(r, t, lp)
        t2 = time.perf_counter()
        host_prepare.append((t1 - t0) * 1e3)
        gpu_forward.append(start_evt.elapsed_time(end_evt))
        host_sample.append((t2 - t1) * 1e3)
        wall.append((t2 - t0) * 1e3)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"batch {batch}: step {med(wall):.2f} ms = prepare (host) {med(host_prepare):.2f} + "
          f"forward/logits/sample {med(host_sample):.2f}; forward on GPU {med(gpu_forward):.2f} ms;"
          f" GPU idle ~{max(0.0, med(wall) - med(gpu_forward)):.2f} ms per step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                    max_name_column_width=60))
    runner.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
