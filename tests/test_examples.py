"""The examples run, and each user-written component changes behaviour observably (its counter
moves) while the outputs stay correct: the greedy tokens of the default components (whose own
correctness test_*_model.py checks against transformers), or transformers' own results where
the example's weights or metric come from elsewhere."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import reference_greedy

from runner import RunnerError, build_runner, compose_config
from runner.build import instantiate
from runner.tasks.verify import reference_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_TOKENS = 8


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def default_tokens():
    """model -> greedy tokens of the examples' prompts with every component from conf/."""
    prompts = load_example("logging_attention").PROMPTS
    cache = {}

    def tokens(model: str) -> list[list[int]]:
        if model not in cache:
            runner = build_runner(compose_config([f"model={model}", "device=cpu"]))
            outputs = runner.generate(prompt_token_ids=prompts, max_tokens=MAX_TOKENS)
            cache[model] = [o.token_ids for o in outputs]
        return cache[model]
    return tokens


def test_every_example_has_a_test():
    tested = {"logging_attention", "block_table", "state_dict_loader", "timed_graph",
              "perplexity_task", "parallel_plan"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_logging_attention_counts_calls_and_keeps_tokens(default_tokens):
    example = load_example("logging_attention")
    tokens, calls = example.main(MAX_TOKENS)
    assert tokens == default_tokens("tiny")
    num_layers = compose_config(["model=tiny"]).model.hf_config.num_hidden_layers
    # every model step calls each layer once; every call writes that step's KV first
    assert calls["prefill"] >= num_layers and calls["prefill"] % num_layers == 0
    assert calls["decode"] >= num_layers * (MAX_TOKENS - 1)
    assert calls["decode"] % num_layers == 0
    assert calls["write_kv"] == calls["prefill"] + calls["decode"]


def test_block_table_policy_changes_layout_and_keeps_tokens(default_tokens):
    example = load_example("block_table")
    tokens, table = example.main(MAX_TOKENS)
    assert tokens == default_tokens("tiny")
    assert (table.block_size, table.virtual_block_size) == (8, 8)  # default: 16 per rank
    # every token's KV is written once, except each request's last generated token
    assert table.num_slots_mapped == sum(len(p) + MAX_TOKENS - 1 for p in example.PROMPTS)
    under_dcp = example.FixedVirtualBlockTable(virtual_block_size=8, cp_size=2, cp_rank=1)
    assert (under_dcp.block_size, under_dcp.virtual_block_size) == (4, 8)
    with pytest.raises(RunnerError, match="virtual_block_size"):
        example.FixedVirtualBlockTable(virtual_block_size=6, cp_size=4)


def test_state_dict_loader_matches_transformers():
    example = load_example("state_dict_loader")
    tokens, loader, hf_model = example.main(MAX_TOKENS)
    assert loader.num_tensors_loaded == len(hf_model.state_dict())
    expected = [reference_greedy(hf_model, p, MAX_TOKENS) for p in example.PROMPTS]
    assert tokens == expected


def test_timed_graph_times_every_decode_step_and_keeps_tokens(default_tokens):
    example = load_example("timed_graph")
    tokens, graph = example.main(MAX_TOKENS)
    assert tokens == default_tokens("tiny")
    assert len(graph.step_times_ms) >= MAX_TOKENS - 1
    assert all(t > 0 for t in graph.step_times_ms)


def test_perplexity_task_matches_transformers(default_tokens, tmp_path):
    """The task's perplexity equals exp(-mean log p) of the same tokens under transformers'
    model with the same (dummy) weights, teacher-forced in float32."""
    example = load_example("perplexity_task")
    metrics = example.main(MAX_TOKENS)
    assert metrics["token_ids"] == default_tokens("tiny_llama")
    cfg = compose_config(["model=tiny_llama", "device=cpu"])
    model = reference_model(instantiate(cfg, "model", {}, seed=cfg.seed), torch.device("cpu"),
                            str(tmp_path))
    all_logprobs = []
    for prompt, generated, perplexity in zip(example.PROMPTS, metrics["token_ids"],
                                             metrics["perplexity_per_prompt"]):
        ids = torch.tensor([prompt + generated])  # [1, L]
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].double()  # [N, vocab]
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(generated)[:, None])
        all_logprobs += logprobs.squeeze(1).tolist()
        assert perplexity == pytest.approx(math.exp(-logprobs.mean().item()), rel=1e-4)
    expected = math.exp(-sum(all_logprobs) / len(all_logprobs))
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert metrics["num_tokens"] == MAX_TOKENS * len(example.PROMPTS)


def test_parallel_plan_example_runs_two_ranks_as_a_script(default_tokens):
    """The user's path: `python examples/parallel_plan.py` launches two ranks, each with its
    own LoggingPlan; each rank reports its half of the heads, and the tokens equal tp=1's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(EXAMPLES / "parallel_plan.py")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    heads = dict(re.findall(r"^rank (\d): (q heads .*)$", result.stdout, re.MULTILINE))
    # tiny_llama: 8 query heads and 2 KV heads, split over tp=2
    assert heads == {"0": "q heads 0..3, kv heads 0..0", "1": "q heads 4..7, kv heads 1..1"}
    printed = re.findall(r"^(\[.*\]) -> (\[.*\])$", result.stdout, re.MULTILINE)
    assert [json.loads(tokens) for _, tokens in printed] == default_tokens("tiny_llama")
