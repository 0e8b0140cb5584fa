"""Run a function on every rank: in this process for one rank, else spawned processes (or the
processes torchrun started). Rank 0's return value comes back."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig


def launch(cfg: DictConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn(cfg, plan_rank, *args)` on every rank and return rank 0's result.

    Components given as Python objects travel inside `args`: in a multi-rank run they must be
    picklable and rank-agnostic (or be classes/factories called on each rank)."""
    world_size = cfg.parallel.tp
    if world_size == 1:
        return fn(cfg, 0, *args)
    from runner.spawn import run_ranks
    return run_ranks(cfg, world_size, fn, *args)
