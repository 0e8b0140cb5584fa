"""dcp-runner: a readable LLM model runner with tensor, expert and decode context parallelism."""
from runner.build import build_runner
from runner.compose import compose_config
from runner.errors import RunnerError
from runner.launch import launch
from runner.runner import Runner

__all__ = ["build_runner", "compose_config", "launch", "Runner", "RunnerError"]
