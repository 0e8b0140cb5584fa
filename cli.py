"""Command line: `python cli.py [group=option] [key=value ...]` (Hydra). See README.md."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.compose import check_choices
from runner.config import register_configs
from runner.errors import RunnerError

register_configs()


def run_rank(cfg: DictConfig, rank: int, output_dir: str) -> dict:
    """What every rank does: build its runner, run the task. Rank 0's metrics come back."""
    from runner.build import build_runner, instantiate, to_yaml
    from runner.console import print_config
    from runner.summary import print_summary

    task = instantiate(cfg, "task", {})
    runner = build_runner(cfg)
    if runner.plan.is_driver:
        if cfg.print_config:
            print_config(to_yaml(cfg))
        print_summary(runner)
    task.output_dir = output_dir
    try:
        return task.run(runner)
    finally:
        runner.shutdown()


def run(cfg: DictConfig, output_dir: str = ".") -> dict:
    """Check the config, start the ranks, run the task; rank 0's metrics."""
    from runner.build import check_config, instantiate
    from runner.launch import launch

    check_config(cfg)
    instantiate(cfg, "task", {})  # the task's own checks (fields, files) before ranks start
    return launch(cfg, run_rank, output_dir)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        check_choices(hydra_cfg.runtime.choices)
        metrics = run(cfg, hydra_cfg.runtime.output_dir)
    except RunnerError as e:
        from runner.console import print_error
        print_error(str(e))
        if multirun:
            return {"status": "failed", "error": str(e)}
        sys.exit(1)
    if metrics.get("exit_code") and not multirun:
        sys.exit(metrics["exit_code"])
    return {"status": "ok" if not metrics.get("exit_code") else "failed", **metrics}


if __name__ == "__main__":
    main()
