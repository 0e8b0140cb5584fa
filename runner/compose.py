"""compose_config(overrides): the CLI's config, composed from Python (no @hydra.main); and the
check that every config group got one of its options, not its schema."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from runner.config import register_configs
from runner.errors import RunnerError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """E.g. compose_config(["model=tiny_llama", "parallel.dcp=2"])."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=list(overrides or []),
                      return_hydra_config=True)
    check_choices(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check_choices(choices: Mapping[str, str | None]) -> None:
    """Refuse a group's `base_*` entry: Hydra lists the schemas (runner/config.py) among a
    group's options, but they leave the component unset."""
    for group, option in choices.items():
        if option and option.startswith("base_") and (Path(CONF_DIR) / group).is_dir():
            options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
            raise RunnerError(f"{group}={option} is the schema of conf/{group}, not an option: "
                              f"choose one of {', '.join(options)}")
