"""Bad task inputs refused with one RunnerError line naming the field: prompts_file contents,
non-finite temperature, an unwritable task.output, bench lengths beyond max_model_len, verify
counts; and a verify request that ends with an error fails the verify, the others still
compared. Checked on the task objects with a tiny in-process runner, and twice through cli.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import RunnerError, build_runner, compose_config
from runner.tasks.bench import BenchTask
from runner.tasks.generate import GenerateTask
from runner.tasks.verify import VerifyTask

CLI = Path(__file__).resolve().parent.parent / "cli.py"
TINY_VOCAB_SIZE = 512  # conf/model/tiny.yaml
MAX_MODEL_LEN = 32


@pytest.fixture(scope="module")
def runner():
    """The tiny model with max_model_len=32."""
    built = build_runner(compose_config(["device=cpu", f"model.max_model_len={MAX_MODEL_LEN}",
                                         "block_table.block_size=16"]))
    yield built
    built.shutdown()


def _write_lines(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("ids", ['["a"]', "[[1, 2]]", "[1.9, 2.7, 3]", "[true, false, 5]",
                                 "[1, null]", '"1 2 3"', "7"])
def test_prompts_file_refuses_ids_that_are_not_ints(tmp_path, ids):
    path = _write_lines(tmp_path / "p.jsonl", '{"prompt_token_ids": [1, 2]}', "",
                        f'{{"prompt_token_ids": {ids}}}')
    with pytest.raises(RunnerError, match=r"^task\.prompts_file line 3: .*int") as caught:
        GenerateTask(prompts_file=path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("record, message", [
    ('{"prompt_token_ids": [1], "max_tokens": 4}', "unknown key 'max_tokens'"),
    ('{"text": "hi"}', "unknown key 'text'"),
    ('{"prompt": "hi", "prompt_token_ids": [1]}', "exactly one of"),
    ("{}", "exactly one of"),
    ('{"prompt": 5}', "must be a string"),
    ("[1, 2]", "expected"),
])
def test_prompts_file_refuses_other_records(tmp_path, record, message):
    path = _write_lines(tmp_path / "p.jsonl", record)
    with pytest.raises(RunnerError, match=rf"^task\.prompts_file line 1: .*{message}"):
        GenerateTask(prompts_file=path)


def test_prompts_file_not_utf8(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xff\xfe{"prompt_token_ids": [1]}\n')
    with pytest.raises(RunnerError, match=r"^task\.prompts_file=.*not UTF-8"):
        GenerateTask(prompts_file=str(path))


def test_prompts_file_good_lines_run(tmp_path, runner):
    """Plain ints of any size pass the file check (the vocabulary is checked per request)."""
    path = _write_lines(tmp_path / "p.jsonl", '{"prompt_token_ids": [3, 4, 5]}',
                        f'{{"prompt_token_ids": [{TINY_VOCAB_SIZE}]}}')
    result = GenerateTask(prompts_file=path, max_tokens=2).run(runner)
    assert (result["num_requests"], result["failed_requests"], result["exit_code"]) == (2, 1, 1)


@pytest.mark.parametrize("task", [GenerateTask, VerifyTask])
def test_prompt_token_ids_refuse_bools(task):
    with pytest.raises(RunnerError, match=r"^task\.prompt_token_ids\[1\]: token id true"):
        task(prompt_token_ids=[[1, 2], [True, 3]])


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -float("inf"), -0.5, 1e-9])
def test_temperature_must_be_zero_or_a_finite_positive_number(temperature):
    with pytest.raises(RunnerError, match=r"^task\.temperature=.*0 \(greedy\) or a finite number"):
        GenerateTask(temperature=temperature)


def test_output_in_missing_folder_refused_before_generating(tmp_path):
    with pytest.raises(RunnerError, match=r"^task\.output=.*does not exist"):
        GenerateTask(output=str(tmp_path / "missing" / "out.json"))
    with pytest.raises(RunnerError, match=r"^task\.output=.*is a folder"):
        GenerateTask(output=str(tmp_path))
    GenerateTask(output=str(tmp_path / "out.json"))  # an existing folder is fine


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_read_only_folder_refused(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(RunnerError, match=r"^task\.output=.*not writable"):
            GenerateTask(output=str(folder / "out.json"))
    finally:
        folder.chmod(0o700)


def test_bench_output_in_missing_folder_refused_before_requests(tmp_path, runner):
    task = BenchTask(num_prompts=1, input_len=4, output_len=4, output="missing/bench.json")
    task.output_dir = str(tmp_path)
    before = len(runner.requests)
    with pytest.raises(RunnerError, match=r"^task\.output=.*does not exist"):
        task.run(runner)
    assert len(runner.requests) == before


@pytest.mark.parametrize("input_len, output_len", [(MAX_MODEL_LEN, 1), (16, 64), (1, 32)])
def test_bench_lengths_beyond_max_model_len_refused(runner, input_len, output_len):
    before = len(runner.requests)
    task = BenchTask(num_prompts=2, input_len=input_len, output_len=output_len, output=None)
    with pytest.raises(RunnerError, match=r"^task\.input_len=.*task\.output_len=.*"
                                          rf"model\.max_model_len={MAX_MODEL_LEN}"):
        task.run(runner)
    assert len(runner.requests) == before  # refused before any request (warm-ups included)


def test_bench_at_max_model_len_generates_every_token(runner):
    task = BenchTask(num_prompts=2, input_len=MAX_MODEL_LEN - 3, output_len=3, output=None)
    metrics = task.run(runner)
    assert (metrics["completed"], metrics["failed"], metrics["total_output_tokens"]) == (2, 0, 6)


def test_bench_where_every_request_fails_ends(runner, monkeypatch):
    """Requests refused at once leave nothing running: the loop ends (it used to index past
    the last arrival) and reports them failed."""
    monkeypatch.setattr(BenchTask, "_prompts", lambda self, num, vocab, salt: [[]] * num)
    metrics = BenchTask(num_prompts=2, input_len=4, output_len=4, output=None).run(runner)
    assert (metrics["completed"], metrics["failed"]) == (0, 2)


@pytest.mark.parametrize("field, value", [("num_prompts", 0), ("num_prompts", -1),
                                          ("max_tokens", 0), ("prompt_token_ids", []),
                                          ("min_agreement", 2.0), ("min_agreement", -0.1),
                                          ("logprob_tolerance", -1.0),
                                          ("logprob_tolerance", float("nan"))])
def test_verify_counts_and_thresholds_refused(field, value):
    with pytest.raises(RunnerError, match=rf"^task\.{field}="):
        VerifyTask(**{field: value})


def test_verify_failed_requests_fail_it_and_others_are_compared(runner, capsys):
    prompts = [[1, 2, 3], [TINY_VOCAB_SIZE + 487], [5] * (MAX_MODEL_LEN + 1), [7, 8]]
    result = VerifyTask(prompt_token_ids=prompts, max_tokens=2).run(runner)
    assert result["exit_code"] == 1 and result["failed_requests"] == 2
    assert result["min_agreement"] == 1.0 and result["max_logprob_diff"] < 1e-3
    verdict = [line for line in capsys.readouterr().out.splitlines() if "verify" in line]
    assert len(verdict) == 1 and verdict[0].startswith("verify FAILED: ")
    assert "2 of 4 requests ended with an error (prompt 1: token id 999" in verdict[0]


def test_verify_where_every_request_fails(runner):
    result = VerifyTask(prompt_token_ids=[[TINY_VOCAB_SIZE]], max_tokens=2).run(runner)
    assert result["exit_code"] == 1 and result["failed_requests"] == 1
    assert result["min_agreement"] is None


def _cli(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(CLI), "device=cpu", "print_config=false",
                           f"hydra.run.dir={workdir}/run", *overrides], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_prompts_file_is_one_line(tmp_path):
    _write_lines(tmp_path / "p.jsonl", json.dumps({"prompt_token_ids": [1.9, 2.7, 3]}))
    proc = _cli(tmp_path, "task.prompts_file=p.jsonl", f"task.output={tmp_path}/out.json")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert errors == ["error: task.prompts_file line 1: token id 1.9 is not an int "
                      "(prompt_token_ids must be a list of int)"]


def test_cli_verify_with_a_bad_request_fails_in_one_line(tmp_path):
    proc = _cli(tmp_path, "task=verify", "task.prompt_token_ids=[[1,2,3],[999]]",
                "task.max_tokens=2")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in text
    verdict = [line for line in text.splitlines() if line.startswith("verify")]
    assert len(verdict) == 1 and "(prompt 1: token id 999 is outside" in verdict[0]
