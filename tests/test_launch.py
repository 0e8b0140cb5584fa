"""Launching ranks: torchrun gives the same tokens as one process; a rank that raises or is
killed brings the run down at once with the rank and cause named, leaving no process behind;
invalid layouts fail in the CLI with one line, exit 1, no traceback, before any process starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BASE = ["device=cpu", "print_config=false", "block_table.block_size=4", "model.max_model_len=64"]
PROMPTS = [[7], [3, 9, 27, 81, 243], [11 * i % 512 for i in range(1, 30)]]
MAX_TOKENS = 6


def _user_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a user's CPU run
    return env


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are dead, only not yet reaped
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            with open(f"/proc/{child}/cmdline") as f:
                found.append((child, f.read().replace("\0", " ")))
        except OSError:
            continue
        todo += children.get(child, [])
    return found


def _rank_processes() -> list[tuple[int, str]]:
    # NOTE: multiprocessing's resource tracker is a helper of this process that lives as long
    # as it does, not a rank.
    return [p for p in _descendants(os.getpid()) if "resource_tracker" not in p[1]]


def test_torchrun_two_ranks_give_tp1_tokens(tmp_path):
    from runner.build import build_runner
    from runner.compose import compose_config
    from runner.request import SamplingParams

    out = tmp_path / "out.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
           "cli.py", *BASE, "parallel.tp=2", "task=generate", f"task.max_tokens={MAX_TOKENS}",
           "task.ignore_eos=true", f"task.prompt_token_ids={json.dumps(PROMPTS).replace(' ', '')}",
           f"task.output={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_user_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        runner = build_runner(compose_config(BASE))
        tp1 = runner.generate(PROMPTS, params=SamplingParams(MAX_TOKENS, ignore_eos=True))
    outputs = json.loads(out.read_text())["outputs"]
    assert [o["token_ids"] for o in outputs] == [o.token_ids for o in tp1]
    assert [o["prompt_token_ids"] for o in outputs] == PROMPTS


def fail_on_one_rank(cfg, rank: int, how: str, bad_rank: int, waiting: str, stamp: str) -> None:
    """Rank function: `bad_rank` raises, exits 0 or SIGKILLs itself. The others wait in a barrier
    (`collective`), sleep outside any collective (`sleep`: only the launcher can stop them), or
    rank 0 sleeps and the rest wait in the barrier (`mixed`)."""
    import torch.distributed as dist

    if rank == bad_rank:
        Path(stamp).write_text(str(time.time()))
        if how == "raise":
            raise ValueError(f"injected failure on rank {rank}")
        if how == "exit":
            os._exit(0)  # no result, no error: only its exit is seen
        os.kill(os.getpid(), signal.SIGKILL)
    if waiting == "sleep" or (waiting == "mixed" and rank == 0):
        time.sleep(300)
    dist.barrier()


@pytest.mark.parametrize("how, world_size, bad_rank, waiting, cause", [
    ("raise", 3, 1, "mixed", "ValueError: injected failure on rank 1"),
    ("exit", 2, 1, "collective", "exited with status 0 without a result"),
    ("kill", 4, 2, "sleep", "killed by signal 9"),
    ("kill", 4, 2, "collective", "killed by signal 9"),
])
def test_failing_rank_stops_the_run(tmp_path, how, world_size, bad_rank, waiting, cause):
    from runner.compose import compose_config
    from runner.errors import RunnerError
    from runner.launch import launch

    cfg = compose_config(BASE + [f"parallel.tp={world_size}"])
    stamp = tmp_path / "failed_at"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCP_RUNNER_COLLECTIVE_TIMEOUT", "120")  # the others must not wait it out
        with pytest.raises(RunnerError) as error:
            launch(cfg, fail_on_one_rank, how, bad_rank, waiting, str(stamp))
    stopped_after = time.time() - float(stamp.read_text())
    deadline = time.time() + 2
    while _rank_processes() and time.time() < deadline:
        time.sleep(0.1)
    assert _rank_processes() == []
    message = str(error.value)
    assert f"rank {bad_rank}" in message and cause in message
    assert "\n" not in message
    assert stopped_after < 10, f"the run took {stopped_after:.1f} s to stop"


# Runs `cli.py` as __main__ once per case (argv) in a forked child, after importing what a
# run imports, so that each case costs its own work only. In a child, a started rank or process
# group exits 99. Prints {case: [exit status, stdout, stderr, seconds]} as JSON.
CLI_CASES_DRIVER = """
import json, multiprocessing.process, os, runpy, sys, tempfile, time
import torch.distributed
import cli  # noqa: F401 - what cli.py imports
from runner.build import build_runner  # noqa: F401 - imported by every run
from runner.loaders.loader import HFModelLoader

HFModelLoader(architecture="LlamaForCausalLM").hf_config()  # transformers' config modules
HFModelLoader().hf_config()

def refuse(*args, **kwargs):
    print("a rank was started", file=sys.stderr)
    os._exit(99)

multiprocessing.process.BaseProcess.start = refuse
torch.distributed.init_process_group = refuse
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    start = time.time()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["cli.py", *argv]
        try:
            runpy.run_path("cli.py", run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out.seek(0)
    err.seek(0)
    results[name] = [status, out.read(), err.read(), time.time() - start]
print(json.dumps(results))
"""

INVALID_LAYOUTS = {  # name -> (overrides, what the message must name)
    "dcp_not_dividing_tp": (["parallel.tp=4", "parallel.dcp=3"], "parallel.dcp=3"),
    "dcp_zero": (["parallel.tp=2", "parallel.dcp=0"], "parallel.dcp=0"),
    "tp_not_dividing_heads": (["parallel.tp=3"], "parallel.tp=3"),
    "gqa_dcp_rule": (["model=tiny_llama", "parallel.tp=2", "parallel.dcp=2"], "parallel.dcp=2"),
    "gqa_dcp_above_replicas": (["model=tiny_llama", "parallel.dcp=4"], "parallel.dcp=4"),
    "interleave_not_dividing_block": (["parallel.dcp=2", "block_table.block_size=8",
                                       "block_table.interleave=3"], "block_table.interleave=3"),
    "ep_experts_not_divisible": (["parallel.tp=4", "parallel.ep=true",
                                  "model.hf_config.n_routed_experts=6"], "parallel.ep"),
    "dcp_comm_unknown": (["parallel.dcp=2", "parallel.dcp_comm=bogus"], "parallel.dcp_comm"),
    "nccl_on_cpu": (["parallel.tp=2", "parallel.backend=nccl"], "parallel.backend=nccl"),
}


def test_invalid_layouts_fail_in_one_line_before_any_rank(tmp_path):
    """Each case is cli.py's main in its own process. A valid two-rank layout shows that the
    guard notices a started rank."""
    cases = {**INVALID_LAYOUTS, "valid_control": (["parallel.tp=2"], None)}
    argv = {name: [*BASE, *overrides, f"hydra.run.dir={tmp_path / name}"]
            for name, (overrides, _) in cases.items()}
    proc = subprocess.run([sys.executable, "-c", CLI_CASES_DRIVER, json.dumps(argv)], cwd=ROOT,
                          env={**_user_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    problems = []
    for name, (status, stdout, stderr, seconds) in json.loads(proc.stdout).items():
        field = cases[name][1]
        lines = stderr.strip().splitlines()
        if field is None:
            if status != 99:
                problems.append(f"{name}: the guard did not notice a started rank: {stderr!r}")
        elif (status != 1 or len(lines) != 1 or not lines[0].startswith("error:")
                or field not in lines[0] or "Traceback" in stdout + stderr):
            problems.append(f"{name}: exit {status}, stderr {stderr.strip()!r}")
        elif seconds > 5:
            problems.append(f"{name}: took {seconds:.1f} s")
    assert not problems, "\n".join(problems)


def _tensor_result(cfg, rank: int) -> dict:
    return {"rank": rank, "values": torch.arange(6.0).reshape(2, 3) * (rank + 1)}


def test_rank_0s_tensors_come_back_by_value(monkeypatch):
    """Rank 0's result, tensors included, reaches the caller intact even when it is read after
    every rank exited (a tensor shared by file descriptor would be gone by then)."""
    from runner import compose_config, spawn
    from runner.launch import launch
    collect = spawn._collect

    def collect_after_exit(procs, results):
        for p in procs:
            p.join(timeout=60)
        return collect(procs, results)

    monkeypatch.setattr(spawn, "_collect", collect_after_exit)
    result = launch(compose_config(["parallel.tp=2", "device=cpu"]), _tensor_result)
    assert result["rank"] == 0 and result["values"].equal(torch.arange(6.0).reshape(2, 3))


def stall_one_rank(cfg, rank: int) -> None:
    """Rank function: rank 1 stalls after setup; rank 0 all-reduces over the tp group."""
    from runner.build import build_runner

    runner = build_runner(cfg)
    if rank == 1:
        time.sleep(300)
    runner.plan.tp.all_reduce(torch.ones(1))


def test_a_stalled_rank_fails_the_run_at_the_collective_timeout():
    """The tp and dcp groups wait DCP_RUNNER_COLLECTIVE_TIMEOUT, not torch's 30-minute default."""
    from runner.compose import compose_config
    from runner.errors import RunnerError
    from runner.launch import launch

    def give_up(signum, frame):
        raise TimeoutError("the run did not stop at the collective timeout")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(90)
    start = time.time()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DCP_RUNNER_COLLECTIVE_TIMEOUT", "5")
            with pytest.raises(RunnerError, match="rank 0"):
                launch(compose_config(BASE + ["parallel.tp=2"]), stall_one_rank)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.time() - start < 60
