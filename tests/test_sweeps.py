"""Multirun sweeps (`cli.py -m ...`) end with one summary at the root of the sweep folder: a table,
summary.txt, summary.csv, summary.json and summary.png. A failed job is reported with its
one-line error while the others still run, and the sweep then exits non-zero; without matplotlib
everything but the PNG is written. The summary's figures are checked against each job's own
bench.json and overrides.yaml, which the job wrote independently of the summary."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from runner.sweep import JobRecord, job_record, swept_keys, write_summary

ROOT = Path(__file__).resolve().parent.parent
NUM_PROMPTS, OUTPUT_LEN = 2, 3
TINY_BENCH = ["task=bench", f"task.num_prompts={NUM_PROMPTS}", "task.input_len=4",
              f"task.output_len={OUTPUT_LEN}", "print_config=false", "device=cpu"]
COMPARED = ("mean_tpot_ms", "mean_ttft_ms", "output_throughput", "kv_capacity_tokens",
            "total_output_tokens")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_sweep(sweep_dir: Path, overrides: list[str], pythonpath: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["OMP_NUM_THREADS"] = "1"  # tiny jobs: threads only contend on a 2-core machine
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "cli.py", "-m", *overrides, *TINY_BENCH,
                           f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_against_job_files(job: dict, row: dict, key: str) -> dict:
    """The summary's figures for one job are the ones its bench.json and overrides hold;
    returns the bench.json."""
    job_dir = Path(job["output_dir"])
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    assert f"{key}={job['swept'][key]}" in overrides
    assert row[key] == str(job["swept"][key])
    bench = json.loads((job_dir / "bench.json").read_text())
    assert bench["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    for name in COMPARED:
        assert job["metrics"][name] == bench[name], name
        assert float(row[name]) == pytest.approx(bench[name], rel=1e-12), name
    return bench


def test_sweep_writes_table_csv_json_and_png(tmp_path):
    """Two jobs, the second on two spawned ranks (tp follows dcp): exit 0, one summary."""
    result = run_sweep(tmp_path, ["model=tiny", "parallel.dcp=1,2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 2 jobs, 2 ok" in result.stdout
    for name in ("summary.txt", "summary.csv", "summary.json", "summary.png"):
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "summary.txt").read_text()
    assert "parallel.dcp" in table and "TPOT ms" in table and "KV tokens" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["swept"] == ["parallel.dcp"] and summary["plot"] == "summary.png"
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["parallel.dcp"] for r in rows] == ["1", "2"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for job, row in zip(summary["jobs"], rows):
        assert job["status"] == "ok" and job["error"] is None and job["wall_s"] > 0
        bench = check_against_job_files(job, row, "parallel.dcp")
        assert f"{bench['mean_tpot_ms']:.2f}" in table
        assert f"{bench['kv_capacity_tokens']}" in table
    png = (tmp_path / "summary.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "summary.png")  # [H, W, 4]
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_failed_job_is_reported_and_sweep_exits_nonzero_without_matplotlib(tmp_path):
    """Job 0 has an invalid layout (dcp=2 with tp=1): it fails with its one-line error, job 1
    still runs, the summary is written, the exit status is 1. matplotlib is hidden, so the
    PNG is missing and the summary says why."""
    hidden = tmp_path / "hidden"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(sweep_dir, ["model=tiny_llama", "parallel.tp=1", "parallel.dcp=2,1"],
                       pythonpath=str(hidden))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    failed, ok = summary["jobs"]
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert "parallel.dcp" in failed["error"] and failed["metrics"] == {}
    assert f"job #0 failed: {failed['error']}" in result.stderr
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"] == failed["error"]
    check_against_job_files(ok, rows[1], "parallel.dcp")
    assert "sweep: 2 jobs, 1 ok" in result.stdout
    assert not (sweep_dir / "summary.png").exists()
    assert summary["plot"] is None and "matplotlib is not installed" in summary["notes"][0]
    assert "matplotlib is not installed" in result.stdout
    assert "matplotlib is not installed" in (sweep_dir / "summary.txt").read_text()


def fake_job(num: int, overrides: list[str], status: JobStatus, value) -> JobReturn:
    """A JobReturn as Hydra's run_job fills it."""
    job = JobReturn(overrides=overrides, status=status)
    job.hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": num},
                                                "runtime": {"output_dir": f"/sweep/{num}"}}})
    job.return_value = value
    return job


def test_job_record_reads_every_kind_of_job_end():
    ok = job_record(fake_job(0, ["parallel.dcp=2", "model=tiny"], JobStatus.COMPLETED,
                             {"status": "ok", "mean_tpot_ms": 1.5, "itls": [0.1]}), 2.0)
    assert (ok.status, ok.error, ok.num) == ("ok", None, 0)
    assert ok.overrides == {"parallel.dcp": 2, "model": "tiny"}
    assert ok.metrics == {"mean_tpot_ms": 1.5}  # lists are not summary material
    refused = job_record(fake_job(1, [], JobStatus.COMPLETED,
                                  {"status": "failed", "error": "parallel.dcp=3: bad"}), 0.1)
    assert (refused.status, refused.error) == ("failed", "parallel.dcp=3: bad")
    exit_code = job_record(fake_job(2, [], JobStatus.COMPLETED,
                                    {"status": "failed", "exit_code": 1, "num_requests": 4}), 1.0)
    assert (exit_code.status, exit_code.error) == ("failed", "exit code 1")
    assert exit_code.metrics == {"exit_code": 1, "num_requests": 4}
    crashed = job_record(fake_job(3, [], JobStatus.FAILED, ValueError("boom\nmore lines")), 1.0)
    assert (crashed.status, crashed.error) == ("failed", "ValueError: boom")


def test_swept_keys_are_declared_sweeps_or_varying_values():
    def records(*layouts):
        return [JobRecord(i, {"parallel.tp": 4, "parallel.dcp": dcp, "model": model}, "ok", None,
                          1.0, "") for i, (dcp, model) in enumerate(layouts)]

    declared = ["parallel.tp=4", "parallel.dcp=1,2"]
    assert swept_keys(records((1, "tiny"), (2, "tiny")), declared) == ["parallel.dcp"]
    # a value that varies without a sweep override (e.g. hydra.sweeper.params) is swept too
    assert swept_keys(records((1, "tiny"), (2, "tiny_llama")), declared) == \
        ["parallel.dcp", "model"]
    assert swept_keys(records((1, "tiny")), declared) == ["parallel.dcp"]  # one job so far


def synthetic_records() -> list[JobRecord]:
    """Four jobs over two swept keys, one of them failed; request_rate inf as bench reports."""
    records = []
    for num, (dcp, model) in enumerate([(1, "tiny"), (2, "tiny"), (1, "tiny_llama"),
                                        (2, "tiny_llama")]):
        metrics = {"mean_tpot_ms": 10.0 / dcp, "mean_ttft_ms": 20.0,
                   "output_throughput": 100.0 * dcp, "kv_capacity_tokens": 1024 * dcp,
                   "request_rate": math.inf}
        records.append(JobRecord(num, {"parallel.dcp": dcp, "model": model}, "ok", None, 1.0,
                                 f"/sweep/{num}", metrics))
    records[3] = JobRecord(3, {"parallel.dcp": 2, "model": "tiny_llama"}, "failed",
                           "parallel.dcp=2: bad", 0.1, "/sweep/3")
    return records


def test_summary_of_several_swept_keys_is_strict_json_and_a_png(tmp_path):
    records = synthetic_records()
    table, notes, written = write_summary(tmp_path, records, ["parallel.dcp=1,2",
                                                              "model=tiny,tiny_llama"])
    assert notes == [] and "summary.png" in written
    assert (tmp_path / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    text = (tmp_path / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert summary["swept"] == ["parallel.dcp", "model"]
    assert summary["jobs"][0]["metrics"]["request_rate"] == "inf"
    assert [j["status"] for j in summary["jobs"]] == ["ok", "ok", "ok", "failed"]
    assert "job #3 failed: parallel.dcp=2: bad" in (tmp_path / "summary.txt").read_text()
    assert table.row_count == 4


def test_summary_without_matplotlib_says_so_and_removes_a_stale_png(tmp_path, monkeypatch):
    (tmp_path / "summary.png").write_bytes(PNG_SIGNATURE)  # from an earlier sweep
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    _, notes, written = write_summary(tmp_path, synthetic_records(), ["parallel.dcp=1,2"])
    assert written == ["summary.txt", "summary.csv", "summary.json"]
    assert not (tmp_path / "summary.png").exists()
    assert "matplotlib is not installed" in notes[0]
    assert len(read_csv(tmp_path / "summary.csv")) == 4
