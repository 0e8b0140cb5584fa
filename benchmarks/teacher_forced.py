"""Teacher-forced decode logits of one parallel layout against another (DCP vs TP in bf16).

    python3 benchmarks/teacher_forced.py --save tp1.pt model=dsv2lite            # one layout
    python3 benchmarks/teacher_forced.py --save dcp2.pt model=dsv2lite parallel.dcp=2
    python3 benchmarks/teacher_forced.py --compare tp1.pt tp2.pt dcp2.pt           # table vs first

Every layout gets the same seeded prompts and is fed the same seeded continuation tokens in place
of its own samples (teacher forcing), so the log-probabilities of decode step k compare position
by position. The spread between two layouts without DCP (tp1, tp2: only reduction orders differ)
is the dtype's noise; DCP should stay within it.
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from runner import build_runner, compose_config, launch
from runner.request import SamplingParams

NUM_REQUESTS = 8


def forced_logprobs(cfg, rank: int, prompt_len: int, num_steps: int) -> torch.Tensor | None:
    """[requests, num_steps, vocab] fp32 log-probs of the decode steps (rank 0), teacher-forced."""
    runner = build_runner(cfg)
    rng = random.Random(0)
    vocab_size = runner.vocab_size
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_len + 7 * i)]
               for i in range(NUM_REQUESTS)]
    forced = [[rng.randrange(vocab_size) for _ in range(num_steps + 1)] for _ in prompts]
    params = SamplingParams(max_tokens=num_steps + 1, ignore_eos=True)
    req_ids = [runner.add_request(p, params) for p in prompts]
    logprobs = torch.zeros(NUM_REQUESTS, num_steps, vocab_size)
    try:
        while runner.has_unfinished():
            batch = runner.scheduler.schedule()
            rows = runner.run_forward(batch).logits.log_softmax(-1).cpu()
            for request, row in zip(batch.requests, rows):
                index, step = req_ids.index(request.req_id), len(request.output_token_ids)
                if not batch.is_prefill:
                    logprobs[index, step - 1] = row
                runner.append_token(request, forced[index][step], float(row[forced[index][step]]))
    finally:
        runner.shutdown()
    return logprobs if runner.plan.is_driver else None


def compare(paths: list[str]) -> str:
    ref = torch.load(paths[0])
    lines = [f"teacher-forced decode log-probs vs {paths[0]} ({ref.shape[0]} requests x "
             f"{ref.shape[1]} steps x {ref.shape[2]} vocab)",
             f"{'layout':<28} {'max |dlogp|':>12} {'mean |dlogp|':>13} {'top-1 agree':>12}"]
    for path in paths[1:]:
        other = torch.load(path)
        diff = (other - ref).abs()
        agree = (other.argmax(-1) == ref.argmax(-1)).float().mean()
        lines.append(f"{path:<28} {diff.max():12.4e} {diff.mean():13.4e} {agree:12.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", help="run the layout given by the overrides, save log-probs")
    parser.add_argument("--compare", nargs="+", help="saved files; the first is the reference")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    args, overrides = parser.parse_known_args(argv)
    if args.compare:
        print(compare(args.compare))
        return
    if not args.save:
        parser.error("give --save FILE (with Hydra overrides) or --compare FILES")
    cfg = compose_config(["print_config=false", *overrides])
    torch.save(launch(cfg, forced_logprobs, args.prompt_len, args.steps), args.save)


if __name__ == "__main__":
    main(sys.argv[1:])
