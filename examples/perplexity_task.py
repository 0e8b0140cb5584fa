"""A user task: generate greedily and report the perplexity the model gives its own
continuations (exp of minus the mean log-probability of the generated tokens).

A task is any object with `run(runner) -> dict`; the dict is its metrics, as a sweep reads them.
Run: python examples/perplexity_task.py
"""
from __future__ import annotations

import math

from runner import build_runner, compose_config
from runner.request import SamplingParams

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


class PerplexityTask:
    def __init__(self, prompt_token_ids: list[list[int]], max_tokens: int = 8) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # greedy

    def run(self, runner) -> dict:
        ids = [runner.add_request(p, self.params) for p in self.prompt_token_ids]
        while runner.has_unfinished():
            runner.step()
        logprobs = [runner.requests[i].logprobs for i in ids]  # per generated token
        all_logprobs = [lp for request in logprobs for lp in request]
        return {"perplexity": math.exp(-sum(all_logprobs) / len(all_logprobs)),
                "perplexity_per_prompt": [math.exp(-sum(lp) / len(lp)) for lp in logprobs],
                "token_ids": [runner.requests[i].output_token_ids for i in ids],
                "num_tokens": len(all_logprobs)}


def main(max_tokens: int = 8) -> dict:
    """The task's metrics on the tiny Llama model (dummy weights)."""
    runner = build_runner(compose_config(["model=tiny_llama", "device=cpu"]))
    metrics = PerplexityTask(PROMPTS, max_tokens).run(runner)
    print(f"perplexity {metrics['perplexity']:.3f} over {metrics['num_tokens']} tokens; "
          f"per prompt {[round(p, 3) for p in metrics['perplexity_per_prompt']]}")
    return metrics


if __name__ == "__main__":
    main()
