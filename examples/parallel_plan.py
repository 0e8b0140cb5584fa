"""A user parallel plan on two ranks: the default plan, logging the attention heads each rank
takes. Multi-rank runs from Python go through `runner.launch(cfg, fn)`: `fn(cfg, rank)` runs on
every rank (a module-level function, so spawned processes can import it) and rank 0's result
comes back. Components are built inside `fn`, so each rank gets its own.

Run: python examples/parallel_plan.py
"""
from __future__ import annotations

import sys

from runner import build_runner, compose_config, launch
from runner.parallel.plan import HeadShard, ParallelPlan

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


class LoggingPlan(ParallelPlan):
    """ParallelPlan that records every head shard it hands to the model."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shards: list[tuple[str, int, int, int]] = []  # (kind, total heads, offset, count)

    def attention_heads(self, num_heads: int) -> HeadShard:
        shard = super().attention_heads(num_heads)
        self.shards.append(("q", num_heads, shard.offset, shard.num_heads))
        return shard

    def kv_heads(self, num_kv_heads: int) -> HeadShard:
        shard = super().kv_heads(num_kv_heads)
        self.shards.append(("kv", num_kv_heads, shard.offset, shard.num_heads))
        return shard


def run_rank(cfg, rank: int, max_tokens: int) -> tuple[list[list[int]], list[tuple]]:
    """On every rank: build a runner with this rank's plan, generate; tokens and head shards."""
    plan = LoggingPlan(tp=cfg.parallel.tp, dcp=cfg.parallel.dcp)
    runner = build_runner(cfg, parallel=plan)
    try:
        outputs = runner.generate(prompt_token_ids=PROMPTS, max_tokens=max_tokens)
    finally:
        runner.shutdown()
    (_, _, q_offset, num_q), (_, _, kv_offset, num_kv) = plan.shards[:2]  # same in every layer
    # one write per line, so the two ranks' lines do not interleave
    sys.stdout.write(f"rank {rank}: q heads {q_offset}..{q_offset + num_q - 1}, "
                     f"kv heads {kv_offset}..{kv_offset + num_kv - 1}\n")
    sys.stdout.flush()
    return [o.token_ids for o in outputs], plan.shards


def main(max_tokens: int = 8) -> tuple[list[list[int]], list[tuple]]:
    """Rank 0's greedy tokens and head shards of a tp=2 run of the tiny Llama model."""
    cfg = compose_config(["model=tiny_llama", "parallel.tp=2", "device=cpu"])
    token_ids, shards = launch(cfg, run_rank, max_tokens)
    for prompt, tokens in zip(PROMPTS, token_ids):
        print(f"{prompt} -> {tokens}")
    return token_ids, shards


if __name__ == "__main__":
    main()
