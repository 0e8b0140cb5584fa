"""Greedy tokens (float32, CPU, gloo) are the same under every parallel layout: tp, tp+dcp (both
comm modes, several interleaves), tp+ep, for the MLA model (tiny) and the GQA model (tiny_llama),
equal to tp1's and to transformers' own greedy tokens with the same weights. Each prompt set mixes
prompts shorter than dcp x interleave (empty shards) with prompts spanning several virtual blocks;
one set joins requests while others decode, one runs with a cache small enough to preempt. Every
rank must end with the same tokens. Also: `cli.py ... task.output=...` writes the same JSON under
a DCP layout as with tp1.

All layouts of one world size share one spawned run (spawning ranks dominates the cost)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from runner.compose import compose_config
from runner.request import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 4
BASE = ["device=cpu", "print_config=false", f"block_table.block_size={BLOCK_SIZE}",
        "model.max_model_len=96"]
PREEMPT_CAPACITY = 32  # tokens the preemption runs' cache holds in every layout
MODELS = {"tiny": "model=tiny", "llama": "model=tiny_llama"}

# name -> overrides; the name starts with the model key
LAYOUTS = {
    "tiny-tp1": [],
    "tiny-tp2": ["parallel.tp=2"],
    "tiny-tp2-dcp2": ["parallel.dcp=2"],
    "tiny-tp4": ["parallel.tp=4"],
    "tiny-tp4-dcp2": ["parallel.tp=4", "parallel.dcp=2"],
    "tiny-tp4-dcp4": ["parallel.dcp=4", "parallel.dcp_comm=ag_rs"],
    "tiny-tp4-dcp4-il2": ["parallel.dcp=4", "block_table.interleave=2"],
    f"tiny-tp4-dcp4-il{BLOCK_SIZE}": ["parallel.dcp=4", f"block_table.interleave={BLOCK_SIZE}"],
    "tiny-tp4-dcp4-a2a": ["parallel.dcp=4", "parallel.dcp_comm=a2a"],
    "tiny-tp4-ep": ["parallel.tp=4", "parallel.ep=true"],
    "llama-tp1": [],
    "llama-tp2": ["parallel.tp=2"],
    "llama-tp4": ["parallel.tp=4"],
    "llama-tp4-dcp2": ["parallel.tp=4", "parallel.dcp=2"],
}


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


# name -> (prompts, max_tokens). With block size 4 a virtual block holds 4 * dcp tokens; the
# 1-, 3- and 6-token prompts stay shorter than dcp x interleave = 16 for part of the run.
PROMPT_SETS = {
    "batch": (_prompts([1, 3, 6, 45], seed=1), 8),
    "staggered": (_prompts([20, 2, 33, 9], seed=2), 7),  # the last two join while decoding
    "preempt": (_prompts([10, 5, 14], seed=3), 10),  # 59 tokens into a 32-token cache
}
NUM_JOIN_LATER = 2
NUM_STEPS_BEFORE_JOIN = 3


def _model_key(layout: str) -> str:
    return layout.split("-")[0]


def _overrides(layout: str) -> list[str]:
    return BASE + [MODELS[_model_key(layout)]] + LAYOUTS[layout]


def _configs(layout: str):
    """(config of the main runner, config of the preemption runner) for one layout."""
    cfg = compose_config(_overrides(layout))
    vbs = BLOCK_SIZE * cfg.parallel.dcp
    preempt = compose_config(_overrides(layout) + [
        f"block_table.num_blocks={PREEMPT_CAPACITY // vbs}",
        f"model.max_model_len={PREEMPT_CAPACITY}"])
    return cfg, preempt


def _run_staggered(runner, prompts, params) -> list[list[int]]:
    first = [runner.add_request(p, params) for p in prompts[:-NUM_JOIN_LATER]]
    for _ in range(NUM_STEPS_BEFORE_JOIN):
        runner.step()
    later = [runner.add_request(p, params) for p in prompts[-NUM_JOIN_LATER:]]
    while runner.has_unfinished():
        runner.step()
    assert runner.scheduler.log.joined_while_decoding == NUM_JOIN_LATER
    return [runner.output(i).token_ids for i in first + later]


def _run_layout(main_cfg, preempt_cfg) -> dict:
    from runner.build import build_runner

    tokens = {}
    runner = build_runner(main_cfg)
    try:
        for name in ("batch", "staggered"):
            prompts, max_tokens = PROMPT_SETS[name]
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            if name == "staggered":
                tokens[name] = _run_staggered(runner, prompts, params)
            else:
                tokens[name] = [o.token_ids for o in runner.generate(prompts, params=params)]
    finally:
        runner.shutdown()
    runner = build_runner(preempt_cfg)
    try:
        prompts, max_tokens = PROMPT_SETS["preempt"]
        outputs = runner.generate(prompts, params=SamplingParams(max_tokens=max_tokens,
                                                                 ignore_eos=True))
    finally:
        runner.shutdown()
    tokens["preempt"] = [o.token_ids for o in outputs]
    return {"tokens": tokens, "num_preemptions": runner.scheduler.log.num_preemptions,
            "kv_capacity_tokens": runner.kv_capacity_tokens}


def run_layouts(cfg, rank: int, layouts: dict) -> list[dict]:
    """Rank function: every layout of this world size in turn; rank 0 gets every rank's
    results ([rank] -> {layout: result}) so lockstep can be checked."""
    import torch.distributed as dist

    results = {}
    for name, (main_cfg, preempt_cfg) in layouts.items():
        try:
            results[name] = _run_layout(main_cfg, preempt_cfg)
        except Exception as e:
            raise RuntimeError(f"layout {name}: {type(e).__name__}: {e}") from e
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        return gathered
    return [results]


@pytest.fixture(scope="module")
def layout_results():
    """layout -> [per-rank result]; one run per world size, started when first needed."""
    cache: dict[int, list[dict] | Exception] = {}

    def get(layout: str) -> list[dict]:
        world = compose_config(_overrides(layout)).parallel.tp
        if world not in cache:
            from runner.launch import launch
            names = [n for n in LAYOUTS if compose_config(_overrides(n)).parallel.tp == world]
            launch_cfg = compose_config(_overrides(names[0]))
            with pytest.MonkeyPatch.context() as mp:
                mp.delenv("TRITON_INTERPRET", raising=False)  # the CPU path users run
                mp.setenv("DCP_RUNNER_COLLECTIVE_TIMEOUT", "120")  # a hang fails, not waits
                try:
                    cache[world] = launch(launch_cfg, run_layouts,
                                          {n: _configs(n) for n in names})
                except Exception as e:  # every layout of this world fails with it, once
                    cache[world] = e
        if isinstance(cache[world], Exception):
            raise cache[world]
        return [per_rank[layout] for per_rank in cache[world]]

    return get


@pytest.fixture(scope="module")
def hf_greedy():
    """(model key, prompt, tokens) -> transformers' greedy choice after the prompt and each
    prefix of `tokens` (teacher-forced, one forward pass). It equals `tokens` exactly when
    `tokens` are transformers' greedy tokens; at the first difference it shows the right one."""
    from runner.build import check_config
    from runner.tasks.verify import reference_model

    models, cache = {}, {}

    def get(model_key: str, prompt: list[int], tokens: list[int]) -> list[int]:
        key = (model_key, tuple(prompt), tuple(tokens))
        if key not in cache:
            if model_key not in models:
                loader = check_config(compose_config(BASE + [MODELS[model_key]]))
                with tempfile.TemporaryDirectory() as save_dir:
                    models[model_key] = reference_model(loader, torch.device("cpu"), save_dir)
            with torch.inference_mode():
                ids = torch.tensor([prompt + tokens[:-1]])
                logits = models[model_key](ids).logits[0, len(prompt) - 1:]  # [len(tokens), V]
            cache[key] = logits.argmax(-1).tolist()
        return cache[key]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_tokens_equal_across_layouts(layout, layout_results, hf_greedy):
    per_rank = layout_results(layout)
    result = per_rank[0]
    for rank, other in enumerate(per_rank[1:], 1):
        assert other["tokens"] == result["tokens"], f"rank {rank} is out of lockstep with rank 0"
    assert result["num_preemptions"] > 0, "the preemption run did not preempt"
    assert result["kv_capacity_tokens"] == PREEMPT_CAPACITY
    for name, (prompts, max_tokens) in PROMPT_SETS.items():
        for prompt, tokens in zip(prompts, result["tokens"][name]):
            assert len(tokens) == max_tokens
            assert tokens == hf_greedy(_model_key(layout), prompt, tokens), \
                f"{name}: not transformers' greedy tokens for a {len(prompt)}-token prompt"
    tp1 = layout_results(f"{_model_key(layout)}-tp1")[0]
    assert result["tokens"] == tp1["tokens"]


def test_cli_generate_json_under_dcp_equals_tp1(tmp_path, layout_results):
    """The generate contract through the real CLI under DCP: the JSON file holds, in input order,
    each prompt with the tokens tp1 generated for it."""
    prompts, max_tokens = PROMPT_SETS["batch"]
    out = tmp_path / "out.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a user's CPU run
    cmd = [sys.executable, "cli.py", *BASE, "parallel.dcp=2", "block_table.interleave=2",
           "task=generate", f"task.max_tokens={max_tokens}", "task.ignore_eos=true",
           f"task.prompt_token_ids={json.dumps(prompts).replace(' ', '')}", f"task.output={out}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp1_tokens = layout_results("tiny-tp1")[0]["tokens"]["batch"]
    expected = [{"prompt_token_ids": p, "token_ids": t, "text": None, "finish_reason": "length",
                 "error": None} for p, t in zip(prompts, tp1_tokens)]
    assert json.loads(out.read_text()) == {"outputs": expected}
