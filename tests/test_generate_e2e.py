"""End to end on one rank: tiny checkpoints saved by transformers, loaded through the real config
path (build_runner(compose_config([...]))), against transformers' own greedy generate() on the
same folder: batches across block boundaries, requests joining while others decode, preemption,
EOS, the CLI's JSON output, and seeded sampling."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (GreedyReference, build_test_runner, make_checkpoint, random_prompts,
                     reference_greedy, save_tokenizer, tokenizer_vocab)

from runner.errors import RunnerError
from runner.request import SamplingParams

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli.py")
BLOCK = "block_table.block_size=16"
LENGTHS = [1, 15, 40, 300]  # with MAX_TOKENS new tokens every request crosses a block boundary
MAX_TOKENS = 20
# A cache of 12 blocks (192 tokens) under max_model_len 160: PREEMPT_LENGTHS fill it at prefill
# and need 25 blocks by the end of PREEMPT_MAX_TOKENS, so requests must be preempted.
SMALL_CACHE = ["model.max_model_len=160", "block_table.num_blocks=12"]
PREEMPT_LENGTHS = [63, 47, 33, 15, 1]
PREEMPT_MAX_TOKENS = 40
OUTPUT_KEYS = ["prompt_token_ids", "token_ids", "text", "finish_reason", "error"]
# name -> (make_checkpoint kind, overrides)
CASES = {
    "dsv2_qlora_yarn_grouped": ("deepseek_v2", {}),
    "dsv2_no_qlora_greedy_routing": ("deepseek_v2", dict(
        q_lora_rank=None, first_k_dense_replace=2, n_shared_experts=3, v_head_dim=28,
        routed_scaling_factor=0.6, topk_method="greedy", n_group=None, topk_group=None)),
    "llama3_gqa_sharded": ("llama", dict(max_shard_size="40KB")),
    "qwen2_tied_bias": ("qwen2", {}),
}


@pytest.fixture(autouse=True)
def no_triton_interpreter(monkeypatch):
    """Run as users do: on CPU the runner uses its torch paths unless TRITON_INTERPRET is set
    (tests/conftest.py sets it for the kernel tests)."""
    # NOTE: @triton.jit reads TRITON_INTERPRET when a kernel module is imported; import it while
    # the variable is still set, so later tests in this process still get interpreted kernels.
    import runner.block_table.paged  # noqa: F401
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: torch's intra-op threads only add overhead, and on a busy 2-core machine
    their spin-waits made these tests several times slower."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> GreedyReference of CASES[name], saved and loaded on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, GreedyReference] = {}

    def get(name: str) -> GreedyReference:
        if name not in built:
            kind, overrides = CASES[name]
            built[name] = GreedyReference(make_checkpoint(root / name, kind, **overrides))
        return built[name]

    return get


def _generate(path: str, prompts: list[list[int]], params: SamplingParams, *overrides: str):
    """(runner, token ids per prompt) of one generate() call on a fresh runner."""
    runner = build_test_runner(path, BLOCK, *overrides)
    return runner, [o.token_ids for o in runner.generate(prompts, params=params)]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_batch_matches_transformers(reference, name):
    ref = reference(name)
    prompts = random_prompts(LENGTHS, ref.vocab_size)
    runner = build_test_runner(ref.path, BLOCK)
    outputs = runner.generate(prompts, max_tokens=MAX_TOKENS)
    assert [o.token_ids for o in outputs] == [ref.greedy(p, MAX_TOKENS) for p in prompts]
    assert [o.finish_reason for o in outputs] == ["length"] * len(prompts)
    assert runner.scheduler.log.num_prefill_steps == 1  # all four prefilled in one batch
    assert runner.weights_source == ref.path
    if name.endswith("sharded"):
        assert os.path.isfile(os.path.join(ref.path, "model.safetensors.index.json"))
        assert len(glob.glob(os.path.join(ref.path, "*.safetensors"))) > 2


@pytest.mark.parametrize("name", ["dsv2_qlora_yarn_grouped", "llama3_gqa_sharded"])
def test_requests_joining_while_others_decode_match(reference, name):
    ref = reference(name)
    prompts = random_prompts(LENGTHS + [7, 33], ref.vocab_size)
    max_tokens = [MAX_TOKENS] * len(LENGTHS) + [9, 25]
    runner = build_test_runner(ref.path, BLOCK)
    req_ids = {}

    def add(*indices: int) -> None:
        for i in indices:
            req_ids[i] = runner.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i]))

    add(3, 0)
    for _ in range(3):
        runner.step()
    add(1, 4)
    for _ in range(4):
        runner.step()
    add(2, 5)
    while runner.has_unfinished():
        runner.step()
    for i, prompt in enumerate(prompts):
        assert runner.output(req_ids[i]).token_ids == ref.greedy(prompt, max_tokens[i]), i
    assert runner.scheduler.log.joined_while_decoding == 4


@pytest.mark.parametrize("name", ["dsv2_qlora_yarn_grouped", "qwen2_tied_bias"])
def test_preemption_recomputes_and_matches(reference, name):
    ref = reference(name)
    prompts = random_prompts(PREEMPT_LENGTHS + [150], ref.vocab_size, seed=2)
    too_long = [[3] * 160, [4] * 200]  # no room to generate under max_model_len 160
    runner = build_test_runner(ref.path, BLOCK, *SMALL_CACHE)
    outputs = runner.generate(prompts[:2] + too_long[:1] + prompts[2:] + too_long[1:],
                              max_tokens=PREEMPT_MAX_TOKENS)
    bad = [outputs.pop(2), outputs.pop()]
    for output in bad:
        assert output.finish_reason == "error" and output.token_ids == []
        assert "max_model_len is 160" in output.error
    assert [o.token_ids for o in outputs[:-1]] == [ref.greedy(p, PREEMPT_MAX_TOKENS)
                                                   for p in prompts[:-1]]
    assert outputs[-1].token_ids == ref.greedy(prompts[-1], 10)  # stopped at max_model_len
    assert all(o.finish_reason == "length" and o.error is None for o in outputs)
    log = runner.scheduler.log
    assert log.num_preemptions > 0
    assert sum(r.num_preemptions for r in runner.requests.values()) == log.num_preemptions
    assert not runner.has_unfinished() and runner.scheduler.allocator.num_free == 12


def test_cache_too_small_for_max_model_len_fails_at_build(reference):
    ref = reference("llama3_gqa_sharded")
    with pytest.raises(RunnerError, match=r"longest that fits is 144\b") as info:
        build_test_runner(ref.path, BLOCK, "model.max_model_len=160", "block_table.num_blocks=9")
    assert "\n" not in str(info.value) and "max_model_len" in str(info.value)


def test_eos_from_generation_config_stops_request(reference, tmp_path):
    ref = reference("llama3_gqa_sharded")
    prompts = random_prompts(LENGTHS, ref.vocab_size)
    greedy = [ref.greedy(p, MAX_TOKENS) for p in prompts]
    tokens = greedy[2]
    index = next(i for i in range(3, MAX_TOKENS) if tokens[i] not in tokens[:i])
    unused = next(t for t in range(ref.vocab_size) if all(t not in g for g in greedy))
    eos_ids = [unused, tokens[index]]  # a list, as generation_config.json allows
    path = str(tmp_path / "ckpt")
    shutil.copytree(ref.path, path)
    with open(os.path.join(path, "generation_config.json")) as f:
        generation_config = json.load(f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({**generation_config, "eos_token_id": eos_ids}, f)

    runner = build_test_runner(path, BLOCK)
    outputs = runner.generate(prompts, max_tokens=MAX_TOKENS)
    expected = [reference_greedy(ref.model, p, MAX_TOKENS, eos_ids) for p in prompts]
    assert [o.token_ids for o in outputs] == expected
    assert outputs[2].token_ids == tokens[:index + 1] and outputs[2].finish_reason == "stop"
    for output in outputs:
        stopped = output.token_ids[-1] in eos_ids
        assert output.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(output.token_ids) == MAX_TOKENS

    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    _, ignoring = _generate(path, prompts, params)
    assert ignoring == greedy


def _cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """`python cli.py OVERRIDES` in tmp_path, as a user runs it (no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, CLI, "print_config=false",
                             f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _read_outputs(path) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    assert list(data) == ["outputs"]
    assert all(list(o) == OUTPUT_KEYS for o in data["outputs"])
    return data["outputs"]


def test_cli_writes_outputs_json(reference, tmp_path):
    ref = reference("qwen2_tied_bias")
    result = _cli(tmp_path, f"model.path={ref.path}", "task=generate",
                  "task.prompt_token_ids=[[1,2,3],[4,5]]", "task.max_tokens=16",
                  "task.output=out.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _read_outputs(tmp_path / "out.json") == [
        {"prompt_token_ids": p, "token_ids": ref.greedy(p, 16), "text": None,
         "finish_reason": "length", "error": None} for p in ([1, 2, 3], [4, 5])]


@pytest.fixture(scope="module")
def tokenizer_checkpoint(reference, tmp_path_factory):
    """The Llama checkpoint with a word-level tokenizer saved next to it. (Not Qwen2: for
    model_type qwen2, transformers 5's AutoTokenizer swaps in its own Qwen2Tokenizer.)"""
    ref = reference("llama3_gqa_sharded")
    path = str(tmp_path_factory.mktemp("with_tokenizer") / "ckpt")
    shutil.copytree(ref.path, path)
    save_tokenizer(path, ref.vocab_size)
    return path, ref


def _text(token_ids: list[int], vocab_size: int) -> str:
    words = {i: w for w, i in tokenizer_vocab(vocab_size).items()}
    return " ".join(words[t] for t in token_ids)


def test_cli_text_prompts(tokenizer_checkpoint, tmp_path):
    path, ref = tokenizer_checkpoint
    result = _cli(tmp_path, f"model.path={path}", 'task.prompts=["hello world the cat"]',
                  "task.output=out.json")
    assert result.returncode == 0, result.stdout + result.stderr
    [output] = _read_outputs(tmp_path / "out.json")
    expected = ref.greedy([3, 4, 5, 6], 16)
    assert output == {"prompt_token_ids": [3, 4, 5, 6], "token_ids": expected,
                      "text": _text(expected, ref.vocab_size), "finish_reason": "length",
                      "error": None}


def test_cli_prompts_file_bad_requests_fail_alone(tokenizer_checkpoint, tmp_path):
    path, ref = tokenizer_checkpoint
    lines = [{"prompt": "the cat sat on the mat"}, {"prompt_token_ids": [ref.vocab_size]},
             {"prompt_token_ids": []}, {"prompt_token_ids": [7, 8, 9, 10]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = _cli(tmp_path, f"model.path={path}", "task.prompts_file=prompts.jsonl",
                  "task.max_tokens=12", "task.output=out.json")
    assert result.returncode != 0
    assert "the cat sat on the mat" in result.stdout  # the table shows a text prompt as text
    outputs = _read_outputs(tmp_path / "out.json")
    assert [o["prompt_token_ids"] for o in outputs] == [[5, 6, 7, 8, 5, 9], [ref.vocab_size], [],
                                                        [7, 8, 9, 10]]
    for i in (0, 3):
        expected = ref.greedy(outputs[i]["prompt_token_ids"], 12)
        assert outputs[i]["token_ids"] == expected
        assert outputs[i]["text"] == _text(expected, ref.vocab_size)
        assert outputs[i]["finish_reason"] == "length" and outputs[i]["error"] is None
    for i, reason in ((1, "outside the vocabulary"), (2, "empty prompt")):
        assert outputs[i]["finish_reason"] == "error" and outputs[i]["token_ids"] == []
        assert reason in outputs[i]["error"]


SAMPLING = SamplingParams(max_tokens=PREEMPT_MAX_TOKENS, temperature=0.8, top_k=20, top_p=0.9,
                          seed=7)


def test_seeded_sampling_independent_of_batch_and_preemption(reference):
    ref = reference("llama3_gqa_sharded")
    prompts = random_prompts(PREEMPT_LENGTHS, ref.vocab_size, seed=2)
    _, alone = _generate(ref.path, prompts[:1], SAMPLING)
    roomy, batched = _generate(ref.path, prompts, SAMPLING)
    small, preempted = _generate(ref.path, prompts, SAMPLING, *SMALL_CACHE)
    assert batched[0] == alone[0]
    assert roomy.scheduler.log.num_preemptions == 0 and small.scheduler.log.num_preemptions > 0
    assert preempted == batched
    assert batched != [ref.greedy(p, PREEMPT_MAX_TOKENS) for p in prompts]  # it did sample
    _, other_seed = _generate(ref.path, prompts, dataclasses.replace(SAMPLING, seed=8))
    assert sum(a != b for a, b in zip(other_seed, batched)) >= 4


def test_seeded_sampling_independent_of_request_position(reference):
    ref = reference("llama3_gqa_sharded")
    prompts = random_prompts(PREEMPT_LENGTHS, ref.vocab_size, seed=2)
    _, alone = _generate(ref.path, prompts[:1], SAMPLING)
    _, behind_others = _generate(ref.path, prompts[1:3] + prompts[:1], SAMPLING)
    assert behind_others[-1] == alone[0]


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k1", "top_p0"])
def test_sampling_keeping_one_token_is_greedy(reference, filters):
    ref = reference("dsv2_qlora_yarn_grouped")
    prompts = random_prompts(LENGTHS, ref.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, seed=3, **filters)
    _, tokens = _generate(ref.path, prompts, params)
    assert tokens == [ref.greedy(p, MAX_TOKENS) for p in prompts]
