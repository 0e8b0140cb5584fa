"""Bad inputs through `cli.py`, as a user types them: exit status non-zero, no Python traceback,
and one line naming the field and what is allowed (Hydra's own compose errors: a few lines that
name the key). One bad request fails alone: the others still run and are written to the JSON.

Every case runs in a subprocess without TRITON_INTERPRET, in a temporary folder; the cases start
together (two at a time) when the module's first test asks for a result.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint
from safetensors.torch import load_file, save_file

CLI = Path(__file__).resolve().parent.parent / "cli.py"
NUM_WORKERS = 2  # the machine's cores
TIMEOUT_S = 300  # per CLI run
MAX_TOKENS = 2  # of the good requests in the one-bad-request cases
TINY_VOCAB_SIZE = 512  # conf/model/tiny.yaml
DROPPED_TENSOR = "model.layers.1.mlp.down_proj.weight"
ESCAPED_EXCEPTION = ("Traceback", "Error executing job")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a GPU-only option on CPU")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float  # user + system time of the CLI process (its spawned ranks excluded)
    output_json: Path

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.lower().startswith("error")]


def run_cli(workdir: Path, overrides: list[str]) -> CliResult:
    """`python cli.py OVERRIDES` in `workdir` (its run folder and output JSON inside it)."""
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # two processes share two cores
    output_json = workdir / "outputs.json"
    command = [sys.executable, str(CLI), "print_config=false", f"hydra.run.dir={workdir}/run",
               f"task.output={output_json}", *overrides]
    with open(workdir / "stdout", "w+") as out, open(workdir / "stderr", "w+") as err:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=err)
        deadline = threading.Timer(TIMEOUT_S, proc.kill)  # a hung run fails, never blocks
        deadline.start()
        _, status, usage = os.wait4(proc.pid, 0)  # CPU time, whatever else loads the machine
        deadline.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return CliResult(proc.returncode, out.read(), err.read(),
                         usage.ru_utime + usage.ru_stime, output_json)


def _checkpoints(root: Path) -> dict[str, str]:
    """A good tiny Llama saved by transformers, and three damaged copies of it."""
    good = make_checkpoint(root / "good", "llama")
    paths = {"good": good}
    for name in ("partial", "corrupt", "pickle_only"):
        paths[name] = str(root / name)
        shutil.copytree(good, paths[name])
    weights = Path(paths["partial"]) / "model.safetensors"
    tensors = load_file(weights)
    assert DROPPED_TENSOR in tensors
    del tensors[DROPPED_TENSOR]
    save_file(tensors, weights, metadata={"format": "pt"})
    weights = Path(paths["corrupt"]) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    weights = Path(paths["pickle_only"]) / "model.safetensors"
    torch.save(load_file(weights), Path(paths["pickle_only"]) / "pytorch_model.bin")
    weights.unlink()
    return paths


# case -> (overrides, substrings of the one error line: the field and what is allowed)
RUNNER_ERRORS = {
    "dtype_int8": (["model.dtype=int8"], ["model.dtype", "'int8'", "float32", "bfloat16"]),
    "block_size_0": (["block_table.block_size=0"], ["block_table.block_size=0", ">= 1"]),
    "max_tokens_0": (["task.max_tokens=0"], ["task.max_tokens=0", ">= 1"]),
    "missing_folder": (["model.path=/nonexistent"], ["model.path=/nonexistent", "no such"]),
    "partial_checkpoint": (["model.path={partial}"], [DROPPED_TENSOR, "missing"]),
    "corrupt_checkpoint": (["model.path={corrupt}"],
                           ["model.path={corrupt}", "model.safetensors", "corrupt"]),
    "pickle_only": (["model.path={pickle_only}"],
                    ["model.path={pickle_only}", "pytorch_model.bin", "safetensors"]),
    "text_prompts_without_tokenizer": (['task.prompts=["hi"]'],
                                       ["task.prompts", "tokenizer", "task.prompt_token_ids"]),
    "schema_as_option": (["attention=base_attention"],  # Hydra lists the schemas as options
                         ["attention=base_attention", "schema", "auto, torch, triton"]),
}
GPU_ONLY_ERRORS = {
    "dsv2lite_on_cpu": (["model=dsv2lite"], ["needs a GPU", "model.requires_gpu", "model=tiny"]),
    "attention_triton_on_cpu": (["attention=triton"], ["attention=triton", "GPU",
                                                       "attention=torch"]),
    "graph_cuda_on_cpu": (["graph=cuda"], ["graph=cuda", "GPU", "graph=eager"]),
}
# Hydra's own errors at compose time: (overrides, what its message must name)
COMPOSE_ERRORS = {
    "unknown_model": (["model=nope"], ["model/nope", "tiny_llama", "dsv2lite"]),
    "unknown_attention": (["attention=nope"], ["attention/nope", "torch"]),
    "unknown_graph": (["graph=nope"], ["graph/nope", "eager"]),
    "misspelled_key": (["model.dtyp=float32"], ["model.dtyp"]),
    "wrong_type": (["scheduler.max_num_seqs=abc"], ["scheduler.max_num_seqs", "abc"]),
}
# One run, bad requests among good ones: prompt index -> substrings of its error
MAX_MODEL_LEN = 32
BAD_REQUESTS = {1: ["empty prompt", "at least one token"],
                2: ["40 tokens", f"max_model_len is {MAX_MODEL_LEN}"],
                3: [f"token id {TINY_VOCAB_SIZE}", f"[0, {TINY_VOCAB_SIZE})"]}
PROMPTS = [[5, 6], [], list(range(2, 42)), [5, TINY_VOCAB_SIZE], [7]]


def _prompt_overrides(prompts: list[list[int]]) -> list[str]:
    ids = json.dumps(prompts).replace(" ", "")
    return [f"task.prompt_token_ids={ids}", f"task.max_tokens={MAX_TOKENS}",
            "task.ignore_eos=true"]


@dataclass
class Runs:
    """The checkpoint folders and every case's CliResult, as futures."""

    paths: dict[str, str]
    futures: dict[str, Future]

    def __getitem__(self, case: str) -> CliResult:
        return self.futures[case].result()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Every case started together, NUM_WORKERS at a time, with the checkpoint paths filled in."""
    root = tmp_path_factory.mktemp("cli")
    paths = _checkpoints(root / "checkpoints")
    cases = {name: overrides for name, (overrides, _) in
             {**GPU_ONLY_ERRORS, **RUNNER_ERRORS, **COMPOSE_ERRORS}.items()}
    cases["bad_requests"] = [f"model.max_model_len={MAX_MODEL_LEN}", *_prompt_overrides(PROMPTS)]
    cases["good_checkpoint"] = ["model.path={good}", *_prompt_overrides([[1, 2]])]
    with ThreadPoolExecutor(NUM_WORKERS) as pool:
        yield Runs(paths, {
            name: pool.submit(run_cli, root / name, [o.format(**paths) for o in overrides])
            for name, overrides in cases.items()})


def _check_failed_cleanly(result: CliResult) -> None:
    assert result.returncode != 0, result.text
    for marker in ESCAPED_EXCEPTION:
        assert marker not in result.text, result.text


def _check_one_error_line(result: CliResult, names: list[str]) -> None:
    _check_failed_cleanly(result)
    lines = result.error_lines()
    assert len(lines) == 1, result.text
    assert lines[0] in result.stderr.splitlines(), result.text
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("case", RUNNER_ERRORS)
def test_bad_input_gives_one_error_line(runs, case):
    names = [n.format(**runs.paths) for n in RUNNER_ERRORS[case][1]]
    _check_one_error_line(runs[case], names)


@cpu_only
@pytest.mark.parametrize("case", GPU_ONLY_ERRORS)
def test_gpu_only_option_on_cpu_gives_one_error_line(runs, case):
    _check_one_error_line(runs[case], GPU_ONLY_ERRORS[case][1])


@cpu_only
def test_dsv2lite_on_cpu_fails_at_once(runs):
    result = runs["dsv2lite_on_cpu"]
    # refused before its 15.7B weights are built (63 GB in float32): CPU time, so that other
    # processes on the machine do not count
    assert result.cpu_seconds < 10, result.cpu_seconds


@pytest.mark.parametrize("case", COMPOSE_ERRORS)
def test_compose_error_names_the_key(runs, case):
    result = runs[case]
    _check_failed_cleanly(result)
    for name in COMPOSE_ERRORS[case][1]:
        assert name in result.text, (name, result.text)


def test_undamaged_checkpoint_runs(runs):
    """The damaged checkpoints fail because of the damage: the folder they were copied from runs."""
    result = runs["good_checkpoint"]
    assert result.returncode == 0, result.text
    outputs = json.loads(result.output_json.read_text())["outputs"]
    assert len(outputs) == 1 and len(outputs[0]["token_ids"]) == MAX_TOKENS


def test_bad_requests_fail_alone(runs):
    """Every prompt is in the JSON, in input order; the good ones ran to max_tokens."""
    result = runs["bad_requests"]
    _check_failed_cleanly(result)
    outputs = json.loads(result.output_json.read_text())["outputs"]
    assert [o["prompt_token_ids"] for o in outputs] == PROMPTS
    for index, output in enumerate(outputs):
        if index not in BAD_REQUESTS:
            assert output["finish_reason"] == "length" and output["error"] is None
            assert len(output["token_ids"]) == MAX_TOKENS
            assert all(0 <= t < TINY_VOCAB_SIZE for t in output["token_ids"])


@pytest.mark.parametrize("index", BAD_REQUESTS)
def test_bad_request_error_says_what_is_allowed(runs, index):
    output = json.loads(runs["bad_requests"].output_json.read_text())["outputs"][index]
    assert output["finish_reason"] == "error" and output["token_ids"] == []
    assert "\n" not in output["error"]
    for name in BAD_REQUESTS[index]:
        assert name in output["error"], (name, output["error"])


@pytest.mark.parametrize("index", BAD_REQUESTS)
def test_bad_request_error_is_one_stderr_line(runs, index):
    result = runs["bad_requests"]
    error = json.loads(result.output_json.read_text())["outputs"][index]["error"]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert sum(error in line for line in lines) == 1, result.text
