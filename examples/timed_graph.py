"""A user graph capturer: eager execution that times every decode step.

Run: python examples/timed_graph.py
"""
from __future__ import annotations

import statistics
import time

import torch

from runner import build_runner, compose_config
from runner.graph.eager import EagerGraph

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


class TimedEagerGraph(EagerGraph):
    """Runs each decode step directly (no graph) and records its wall time."""

    def __init__(self) -> None:
        self.step_times_ms: list[float] = []

    def replay(self, inputs):
        start = time.perf_counter()
        output = super().replay(inputs)  # the step's logits (runner.sampler.StepLogits)
        if output.logits.is_cuda:
            torch.cuda.synchronize()  # GPU kernels run asynchronously: wait before the clock
        self.step_times_ms.append((time.perf_counter() - start) * 1000)
        return output

    def describe(self) -> str:
        return "eager, timed"


def main(max_tokens: int = 8) -> tuple[list[list[int]], TimedEagerGraph]:
    """Greedy tokens per prompt and the capturer with its step times."""
    graph = TimedEagerGraph()
    runner = build_runner(compose_config(["model=tiny", "device=cpu"]), graph=graph)
    outputs = runner.generate(prompt_token_ids=PROMPTS, max_tokens=max_tokens)
    times = graph.step_times_ms
    print(f"{len(times)} decode steps, median {statistics.median(times):.2f} ms, "
          f"max {max(times):.2f} ms")
    for o in outputs:
        print(f"{o.prompt_token_ids} -> {o.token_ids}")
    return [o.token_ids for o in outputs], graph


if __name__ == "__main__":
    main()
