"""compose_config(overrides): the CLI's config, composed from Python (no @hydra.main)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from runner.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """E.g. compose_config(["model=tiny_llama", "parallel.dcp=2"])."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name="config", overrides=list(overrides or []))
