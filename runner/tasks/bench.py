"""task=bench: an engine-level mirror of `vllm bench serve --dataset-name random` (no HTTP
server). Requests arrive at `request_rate` (Poisson, seeded; inf = all at once), at most
`max_concurrency` in flight; per-token timestamps give TTFT, TPOT, ITL with vLLM's definitions."""
from __future__ import annotations

import json
import math
import os
import random
import time

from runner.console import RequestProgress, console
from runner.errors import RunnerError
from runner.request import SamplingParams
from runner.roofline import decode_floor_ms
from runner.tasks.bench_metrics import RequestTiming, compute_metrics, format_report
from runner.tasks.generate import check_output_path


class BenchTask:
    def __init__(self, num_prompts: int = 64, input_len: int = 32, output_len: int = 64,
                 num_warmups: int = 0, request_rate: float = math.inf,
                 max_concurrency: int | None = None, ignore_eos: bool = True, seed: int = 0,
                 output: str | None = "bench.json"):
        for name, value in (("num_prompts", num_prompts), ("input_len", input_len),
                            ("output_len", output_len)):
            if value < 1:
                raise RunnerError(f"task.{name}={value}: must be >= 1")
        if num_warmups < 0:
            raise RunnerError(f"task.num_warmups={num_warmups}: must be >= 0")
        if math.isnan(request_rate) or request_rate <= 0:
            raise RunnerError(f"task.request_rate={request_rate}: must be > 0 (inf = all at once)")
        if max_concurrency is not None and max_concurrency < 1:
            raise RunnerError(f"task.max_concurrency={max_concurrency}: must be >= 1 or null")
        self.num_prompts, self.input_len, self.output_len = num_prompts, input_len, output_len
        self.num_warmups = num_warmups
        self.request_rate = request_rate
        self.max_concurrency = max_concurrency
        self.params = SamplingParams(max_tokens=output_len, ignore_eos=ignore_eos, seed=seed)
        self.seed = seed
        self.output = output
        self.output_dir = "."

    def _prompts(self, num: int, vocab_size: int, salt: int) -> list[list[int]]:
        rng = random.Random(self.seed * 7919 + salt)
        return [[rng.randrange(vocab_size) for _ in range(self.input_len)] for _ in range(num)]

    def _arrivals(self) -> list[float]:
        """Seconds after the start at which each request arrives."""
        if math.isinf(self.request_rate):
            return [0.0] * self.num_prompts
        rng = random.Random(self.seed)
        t, times = 0.0, []
        for _ in range(self.num_prompts):
            times.append(t)
            t += rng.expovariate(self.request_rate)
        return times

    def check_fits(self, max_model_len: int) -> None:
        """Refuse requests longer than the model allows (they would fail or be cut short)."""
        if self.input_len + self.output_len > max_model_len:
            raise RunnerError(f"task.input_len={self.input_len} + task.output_len="
                              f"{self.output_len} is more than model.max_model_len="
                              f"{max_model_len}: their sum must be <= it")

    def run(self, runner) -> dict:
        self.check_fits(runner.max_model_len)
        if self.output:
            check_output_path(os.path.join(self.output_dir, self.output), "task.output")
        driver = runner.plan.is_driver
        if self.num_warmups:
            runner.generate(self._prompts(self.num_warmups, runner.vocab_size, 1),
                            params=self.params)
        prompts = self._prompts(self.num_prompts, runner.vocab_size, 0)
        arrivals = self._arrivals()
        timings: dict[int, RequestTiming] = {}
        next_index = 0
        decode_time, decode_tokens = 0.0, 0  # steps with no prefill in them
        progress = RequestProgress(self.num_prompts, "bench", enabled=driver)
        start = time.perf_counter()
        while next_index < len(prompts) or runner.has_unfinished():
            due = self._due(runner, arrivals, next_index, timings, start)
            now = time.perf_counter()
            for index in range(next_index, next_index + due):
                req_id = runner.add_request(prompts[index], self.params)
                timings[req_id] = RequestTiming(self.input_len, now, [])
            next_index += due
            if not runner.has_unfinished():  # idle until the next arrival, if any
                if next_index < len(arrivals):
                    time.sleep(max(0.0, start + arrivals[next_index] - time.perf_counter()))
                continue
            before = time.perf_counter()
            events = runner.step()
            now = time.perf_counter()
            if not runner.last_step_was_prefill:
                decode_time += now - before
                decode_tokens += len(events)
            for e in events:
                if e.token_id is not None:
                    timings[e.req_id].token_times.append(now)
            progress.update(sum(e.finished for e in events), len(events))
        duration = time.perf_counter() - start
        progress.close()
        for req_id, timing in timings.items():
            output = runner.output(req_id)
            if output.finish_reason == "error":
                timing.success, timing.error = False, output.error
        metrics = compute_metrics(list(timings.values()), duration)
        metrics.update(self._context(runner))
        metrics["decode_phase_output_throughput"] = (decode_tokens / decode_time
                                                     if decode_time else 0.0)
        metrics["decode_phase_duration"] = decode_time
        if driver:
            self._report(metrics)
        return {k: v for k, v in metrics.items() if not isinstance(v, list)}

    def _due(self, runner, arrivals, next_index: int, submitted: dict, start: float) -> int:
        """How many more requests to submit now. Clock-driven, so rank 0 decides for all."""
        in_flight = sum(1 for req_id in submitted if not runner.is_finished(req_id))
        limit = len(arrivals) - next_index
        if self.max_concurrency is not None:
            limit = min(limit, self.max_concurrency - in_flight)
        elapsed = time.perf_counter() - start
        due = 0
        while due < limit and arrivals[next_index + due] <= elapsed:
            due += 1
        if math.isinf(self.request_rate):
            return due  # no clock involved: every rank computes the same number
        return runner.plan.tp.broadcast_object(due)

    def _context(self, runner) -> dict:
        fits = max(1, runner.kv_capacity_tokens // (self.input_len + self.output_len))
        batch = min(self.num_prompts, runner.scheduler.max_num_seqs,
                    self.max_concurrency or self.num_prompts, fits)  # in flight at most
        floor = decode_floor_ms(runner, batch, self.input_len + self.output_len / 2)
        return {"device": runner.device.type,
                "graph_replay_fraction": getattr(runner.graph, "replay_fraction", 0.0),
                "decode_floor_ms": floor, "floor_batch": batch,
                "request_rate": self.request_rate, "max_concurrency": self.max_concurrency,
                "num_prompts": self.num_prompts, "input_len": self.input_len,
                "output_len": self.output_len, "num_warmups": self.num_warmups,
                "kv_capacity_tokens": runner.kv_capacity_tokens, **runner.plan.describe(),
                "engine_level": True}

    def _report(self, metrics: dict) -> None:
        console.print(format_report(metrics), markup=False, highlight=False)
        console.print("(engine-level: measured in-process, no HTTP server)")
        tpot = metrics.get("mean_tpot_ms") or 0.0
        reached = metrics["decode_floor_ms"] / tpot if tpot else 0.0
        metrics["floor_fraction"] = reached
        if metrics["device"] == "cuda":  # graphs and the HBM floor mean nothing on a CPU
            console.print(f"decode steps replayed from CUDA graphs: "
                          f"{metrics['graph_replay_fraction']:.1%}; bandwidth floor at batch "
                          f"{metrics['floor_batch']}: {metrics['decode_floor_ms']:.2f} ms per "
                          f"step (4.3 TB/s), reached {reached:.1%} of it")
        console.print(f"decode-phase output throughput (no prefill in the step): "
                      f"{metrics['decode_phase_output_throughput']:.2f} tok/s over "
                      f"{metrics['decode_phase_duration']:.2f} s; KV capacity "
                      f"{metrics['kv_capacity_tokens']} tokens")
        if self.output:
            path = os.path.join(self.output_dir, self.output)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(_json_safe(metrics), f, indent=1, allow_nan=False)
            console.print(f"wrote {path}")


def _json_safe(metrics: dict) -> dict:
    """Infinite floats (request_rate=inf) written as "inf", as vLLM does: JSON has no inf."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in metrics.items()}
