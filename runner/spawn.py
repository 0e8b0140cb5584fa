"""Multi-rank runs: spawn one process per rank on this machine (or adopt the processes torchrun
started), set up torch.distributed, and tear everything down when any rank fails.

Spawned ranks rendezvous on 127.0.0.1 at a free port; rank 0's result comes back through a
queue, pickled by value (a tensor sent as-is would be shared through a file descriptor that
vanishes if the rank exits before the parent reads it). If a rank raises or dies (even by
SIGKILL), the others are killed at once and the cause is raised here as one RunnerError (a
non-RunnerError also prints the rank's traceback, once).
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runner.distributed import COLLECTIVE_TIMEOUT
from runner.errors import RunnerError

EXIT_GRACE_S = 10  # after every rank reported its result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(name: str, on_gpu: bool) -> str:
    return ("nccl" if on_gpu else "gloo") if name == "auto" else name


def _device_type(cfg) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def init_rank(cfg, rank: int, world_size: int, local_rank: int, init_method: str) -> None:
    """Per-process setup: device, threads, process group."""
    on_gpu = _device_type(cfg) == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(1)
    kwargs = {"device_id": torch.device("cuda", local_rank)} if on_gpu else {}
    dist.init_process_group(_backend(cfg.parallel.backend, on_gpu), init_method=init_method,
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT, **kwargs)


def _rank_entry(rank: int, world_size: int, port: int, cfg, fn, args, results) -> None:
    try:
        init_rank(cfg, rank, world_size, rank, f"tcp://127.0.0.1:{port}")
        result = fn(cfg, rank, *args)
        payload = pickle.dumps(result) if rank == 0 else None
    except RunnerError as e:
        results.put(("error", rank, str(e)))
        sys.exit(1)
    except BaseException as e:  # noqa: BLE001 - the parent reports it once
        results.put(("crash", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        sys.exit(1)
    results.put(("ok", rank, payload))
    dist.barrier()  # leave together: a peer that tears down early can abort gloo's threads
    dist.destroy_process_group()


def run_ranks(cfg, world_size: int, fn: Callable[..., Any], *args: Any) -> Any:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _adopt_torchrun(cfg, world_size, fn, *args)
    if _device_type(cfg) == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, also for gloo's transport
    else:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (device README)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, cfg, fn, args, results),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results)
    finally:
        _stop(procs)


def _collect(procs, results) -> Any:
    """Wait for every rank; the first failure (message or death) ends the run. Once every rank
    has reported success, stragglers get EXIT_GRACE_S to exit (a hung NCCL teardown is killed)."""
    result, ok_ranks, done_at = None, set(), None
    while any(p.exitcode is None for p in procs):
        while not results.empty():
            status, rank, payload = results.get()
            if status == "ok":
                ok_ranks.add(rank)
                result = pickle.loads(payload) if rank == 0 else result
            elif status == "error":
                raise RunnerError(f"rank {rank}: {payload}")
            else:
                # a peer's broken collective is a symptom, not the cause
                _raise_vanished(procs, ok_ranks, results)
                print(f"rank {rank} failed:\n{payload}", file=sys.stderr, flush=True)
                raise RunnerError(f"rank {rank} failed: {payload.splitlines()[0]}")
        if len(ok_ranks) == len(procs):
            done_at = done_at or time.monotonic()
            if time.monotonic() - done_at > EXIT_GRACE_S:
                break  # every result is in; _stop kills what did not exit
        for r, p in enumerate(procs):  # a rank that already reported may die in teardown
            if r not in ok_ranks and p.exitcode not in (None, 0) and results.empty():
                raise RunnerError(f"rank {r} {_how_it_ended(p.exitcode)}; the run was stopped")
        wait([p.sentinel for p in procs if p.exitcode is None] + [results._reader], timeout=1.0)
    while not results.empty():
        status, rank, payload = results.get()
        if status != "ok":
            raise RunnerError(f"rank {rank}: {payload.splitlines()[0]}")
        ok_ranks.add(rank)
        result = pickle.loads(payload) if rank == 0 else result
    for r, p in enumerate(procs):
        if r not in ok_ranks:
            raise RunnerError(f"rank {r} {_how_it_ended(p.exitcode)} without a result; the run "
                              f"was stopped")
    return result


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _raise_vanished(procs, ok_ranks: set[int], results, wait_s: float = 1.0) -> None:
    """If a rank was killed by a signal, or exited without reporting anything (its peers then
    fail in collectives), name it."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for r, p in enumerate(procs):
            if p.exitcode is not None and p.exitcode < 0:
                raise RunnerError(f"rank {r} {_how_it_ended(p.exitcode)}; the run was stopped")
            if p.exitcode == 0 and r not in ok_ranks and results.empty():
                raise RunnerError(f"rank {r} {_how_it_ended(0)} without a result; the run was "
                                  f"stopped")
        time.sleep(0.05)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _adopt_torchrun(cfg, world_size: int, fn, *args) -> Any:
    """This process is one rank that torchrun started (also how a run spans machines)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world_size:
        raise RunnerError(f"torchrun started {size} processes but parallel.tp={world_size}: "
                          f"use --nproc-per-node {world_size}")
    init_rank(cfg, rank, size, int(os.environ.get("LOCAL_RANK", rank)), "env://")
    result = fn(cfg, rank, *args)  # on failure torchrun stops the other ranks
    dist.barrier()
    dist.destroy_process_group()
    return result
