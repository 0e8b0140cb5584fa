"""Multirun summaries: a Hydra Callback (conf/hydra/callbacks/sweep_summary.yaml) that collects
every job's status and metrics and writes one table, summary.csv, summary.json and summary.png at
the root of the sweep folder. The files are rewritten after every job, so an interrupted sweep
keeps the jobs that finished; a sweep with a failed job exits 1 after writing them."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

# (metric key, column header): the table's metric columns and the plot's panels, when present
MAIN_METRICS = (("mean_tpot_ms", "TPOT ms"), ("mean_ttft_ms", "TTFT ms"),
                ("output_throughput", "output tok/s"), ("kv_capacity_tokens", "KV tokens"),
                ("min_agreement", "agreement"), ("max_logprob_diff", "max |dlogprob|"))
NO_MATPLOTLIB = "summary.png not written: matplotlib is not installed (pip install '.[plot]')"
Scalar = (int, float, str, bool, type(None))


@dataclass
class JobRecord:
    """One finished job of a sweep."""

    num: int
    overrides: dict[str, Any]  # every command-line override of this job: key -> value
    status: str  # ok | failed
    error: str | None  # one line, when failed
    wall_s: float  # from job start to job end, rank spawn and teardown included
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)  # the task's scalar metrics


def parse_overrides(lines: list[str]) -> dict[str, Any]:
    """["parallel.dcp=2", "model=tiny"] -> {"parallel.dcp": 2, "model": "tiny"} (typed)."""
    parsed = {}
    for override in OverridesParser.create().parse_overrides(list(lines)):
        value = override.value()
        parsed[override.key_or_group] = (value if isinstance(value, Scalar)
                                         else override.get_value_element_as_str())
    return parsed


def job_record(job_return: JobReturn, wall_s: float) -> JobRecord:
    """A record from what the job returned: cli.main's metrics dict or failure record, or the
    exception that escaped the job."""
    hydra_cfg = job_return.hydra_cfg.hydra
    record = JobRecord(int(hydra_cfg.job.num), parse_overrides(job_return.overrides or []), "ok",
                       None, wall_s, str(hydra_cfg.runtime.output_dir))
    if job_return.status != JobStatus.COMPLETED:
        error = job_return._return_value  # the exception; `.return_value` would re-raise it
        record.status, record.error = "failed", _one_line(f"{type(error).__name__}: {error}")
        return record
    value = job_return._return_value if isinstance(job_return._return_value, dict) else {}
    record.metrics = {k: v for k, v in value.items()
                      if isinstance(v, Scalar) and k not in ("status", "error")}
    if value.get("status") == "failed" or value.get("exit_code"):
        record.status = "failed"
        record.error = _one_line(str(value.get("error") or f"exit code {value.get('exit_code')}"))
    return record


def _one_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def swept_keys(records: list[JobRecord], sweep_overrides: list[str]) -> list[str]:
    """Keys given as sweeps (`key=a,b`) or whose value differs between jobs, in command order."""
    parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    declared = {o.key_or_group for o in parsed if o.is_sweep_override()}
    keys = dict.fromkeys(k for r in records for k in r.overrides)
    return [k for k in keys
            if k in declared or len({repr(r.overrides.get(k)) for r in records}) > 1]


class SweepSummary(Callback):
    """Hydra Callback, active in multirun mode only, and under torchrun on rank 0 only."""

    def __init__(self) -> None:
        self.records: list[JobRecord] | None = None
        self._job_start = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0
            return
        self.records = []
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.sweep_overrides = list(config.hydra.overrides.task)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._job_start = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.records is None:
            return
        self.records.append(job_record(job_return, time.perf_counter() - self._job_start))
        write_summary(self.sweep_dir, self.records, self.sweep_overrides)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.console import console, print_error
        if not self.records:
            return
        table, notes, written = write_summary(self.sweep_dir, self.records, self.sweep_overrides)
        if console.is_terminal:
            console.print(table)
        else:  # logs: the full-width table, never cropped to 80 columns
            console.print(render_text(table).rstrip("\n"), markup=False, crop=False, soft_wrap=True)
        for line in error_lines(self.records):
            print_error(line)
        for note in notes:
            console.print(note, markup=False)
        console.print(f"wrote {', '.join(written)} in {self.sweep_dir}", markup=False)
        num_failed = sum(r.status != "ok" for r in self.records)
        if num_failed:
            print_error(f"{num_failed} of {len(self.records)} jobs failed")
            sys.exit(1)


def write_summary(sweep_dir: Path, records: list[JobRecord],
                  sweep_overrides: list[str]) -> tuple[Table, list[str], list[str]]:
    """Write summary.txt (the table), summary.csv, summary.json and summary.png in `sweep_dir`.
    Returns the table, notes (why the PNG is missing) and the names of the files written."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    swept = swept_keys(records, sweep_overrides)
    common = " ".join(f"{k}={v}" for k, v in records[0].overrides.items() if k not in swept)
    plot_error = write_plot(sweep_dir / "summary.png", records, swept, common)
    notes = [plot_error] if plot_error else []
    if plot_error:
        (sweep_dir / "summary.png").unlink(missing_ok=True)  # never leave a stale plot
    table = summary_table(records, swept, common)
    lines = [*error_lines(records), *notes]
    (sweep_dir / "summary.txt").write_text(render_text(table) + "".join(f"{n}\n" for n in lines))
    _write_csv(sweep_dir / "summary.csv", records, swept)
    summary = {"swept": swept, "common_overrides": common,
               "plot": None if plot_error else "summary.png", "notes": notes,
               "jobs": [_json_job(r, swept) for r in records]}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    written = ["summary.txt", "summary.csv", "summary.json"]
    return table, notes, written if plot_error else [*written, "summary.png"]


def render_text(table: Table) -> str:
    """The table as plain text at its natural width (up to 200 columns)."""
    text = io.StringIO()
    Console(file=text, width=200, color_system=None).print(table)
    return text.getvalue()


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def summary_table(records: list[JobRecord], swept: list[str], caption: str) -> Table:
    """One row per job: swept values, status, main metrics, wall time."""
    metrics = [(k, h) for k, h in MAIN_METRICS if any(k in r.metrics for r in records)]
    num_ok = sum(r.status == "ok" for r in records)
    table = Table(title=f"sweep: {len(records)} jobs, {num_ok} ok", caption=caption or None)
    table.add_column("#", justify="right")
    for key in swept:
        table.add_column(key, min_width=len(key))
    for column in ["status", *(h for _, h in metrics), "wall s"]:
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(str(r.num), *(_format(r.overrides.get(k)) for k in swept),
                      "ok" if r.status == "ok" else "[red]failed[/]",
                      *(_format(r.metrics.get(k)) for k, _ in metrics), f"{r.wall_s:.1f}")
    return table


def error_lines(records: list[JobRecord]) -> list[str]:
    """`job #N failed: <one-line error>` for every failed job."""
    return [f"job #{r.num} failed: {r.error}" for r in records if r.status != "ok"]


def _jsonable(value: Any) -> Any:
    """inf and nan as strings ("inf"), so the file stays strict JSON."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _json_job(r: JobRecord, swept: list[str]) -> dict:
    return {"job": r.num, "swept": {k: r.overrides.get(k) for k in swept},
            "overrides": r.overrides, "status": r.status, "error": r.error,
            "wall_s": r.wall_s, "output_dir": r.output_dir,
            "metrics": {k: _jsonable(v) for k, v in r.metrics.items()}}


def _write_csv(path: Path, records: list[JobRecord], swept: list[str]) -> None:
    """job, swept keys, status, error, wall_s, then every metric any job reported."""
    metric_keys = list(dict.fromkeys(k for r in records for k in r.metrics))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *swept, "status", "error", "wall_s", *metric_keys, "output_dir"])
        for r in records:
            writer.writerow([r.num, *(r.overrides.get(k) for k in swept), r.status, r.error or "",
                             r.wall_s, *(r.metrics.get(k, "") for k in metric_keys),
                             r.output_dir])


def write_plot(path: Path, records: list[JobRecord], swept: list[str], title: str) -> str | None:
    """One panel per main metric against the first swept key (one line per combination of the
    other swept keys); failed jobs are left out. Returns why no plot was written, or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return NO_MATPLOTLIB
    ok = [r for r in records if r.status == "ok"]
    metrics = [(k, h) for k, h in MAIN_METRICS if any(k in r.metrics for r in ok)]
    if not metrics:
        return "summary.png not written: no job reported a metric to plot"
    x_key, others = (swept[0], swept[1:]) if swept else (None, [])
    x_values = list(dict.fromkeys(r.overrides.get(x_key, r.num) for r in records))
    if all(isinstance(v, (int, float)) for v in x_values):
        x_values.sort()
    lines: dict[str, list[JobRecord]] = {}
    for r in ok:
        lines.setdefault(", ".join(f"{k}={r.overrides.get(k)}" for k in others), []).append(r)
    num_cols = min(2, len(metrics))
    num_rows = -(-len(metrics) // num_cols)
    fig = Figure(figsize=(5 * num_cols, 3.5 * num_rows + 0.5), layout="constrained")
    axes = fig.subplots(num_rows, num_cols, squeeze=False).flatten()
    for ax, (key, header) in zip(axes, metrics):
        for label, members in lines.items():
            points = sorted((x_values.index(r.overrides.get(x_key, r.num)), r.metrics[key])
                            for r in members if key in r.metrics)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=label or None)
        ax.set_xticks(range(len(x_values)), [str(v) for v in x_values])
        ax.set_xlabel(x_key or "job")
        ax.set_title(header)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(textwrap.fill(title or "sweep", 90), fontsize="medium")
    fig.savefig(path, dpi=100)
    return None
