"""task=generate: run prompts to completion, show a table, write the outputs as JSON."""
from __future__ import annotations

import json
import os
import time

from runner.console import RequestProgress, console, print_error, print_table
from runner.errors import RunnerError
from runner.request import SamplingParams, sampling_problem
from runner.tasks.prompts import (check_prompt_sources, check_token_ids, read_prompts_file,
                                  resolve_prompts)


def check_output_path(path: str, field: str) -> None:
    """Refuse an output file that could not be written (its folder missing or read-only, or
    the path a folder), so that no outputs are lost after the run."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RunnerError(f"{field}={path!r} is a folder: give a file path")
    if not os.path.isdir(folder):
        raise RunnerError(f"{field}={path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunnerError(f"{field}={path!r}: folder {folder!r} is not writable")


class GenerateTask:
    def __init__(self, prompts=None, prompt_token_ids=None, prompts_file=None, max_tokens: int = 16,
                 ignore_eos: bool = False, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, output: str | None = None):
        self.params = SamplingParams(max_tokens, temperature, top_k, top_p, seed, ignore_eos)
        problem = sampling_problem(self.params)
        if problem:
            raise RunnerError(f"task.{problem}")
        check_prompt_sources(prompts, prompt_token_ids, prompts_file)
        if prompt_token_ids is not None:
            prompt_token_ids = [check_token_ids(p, f"task.prompt_token_ids[{i}]")
                                for i, p in enumerate(prompt_token_ids)]
        if output:
            check_output_path(output, "task.output")
        self.prompts = prompts
        self.prompt_token_ids = prompt_token_ids
        self.file_prompts = read_prompts_file(prompts_file) if prompts_file is not None else None
        self.output = output

    def run(self, runner) -> dict:
        token_ids, texts = resolve_prompts(self.prompts, self.prompt_token_ids, self.file_prompts,
                                           runner.tokenizer, runner.vocab_size, self.params.seed)
        driver = runner.plan.is_driver
        progress = RequestProgress(len(token_ids), "generate", enabled=driver)
        start = time.perf_counter()
        ids = [runner.add_request(p, self.params) for p in token_ids]
        num_tokens = 0
        while runner.has_unfinished():
            events = runner.step()
            num_tokens += len(events)
            progress.update(sum(e.finished for e in events), len(events))
        elapsed = time.perf_counter() - start
        progress.close()
        outputs = [runner.output(i) for i in ids]
        failed = [o for o in outputs if o.finish_reason == "error"]
        if driver:
            self._show(outputs, texts, runner, num_tokens, elapsed)
            for i, o in enumerate(outputs):
                if o.error:
                    print_error(f"prompt {i}: {o.error}")
            if self.output:
                with open(self.output, "w", encoding="utf-8") as f:
                    json.dump({"outputs": [o.to_json() for o in outputs]}, f, indent=1)
                console.print(f"wrote {os.path.abspath(self.output)}")
        return {"num_requests": len(outputs), "failed_requests": len(failed),
                "output_tokens": num_tokens, "duration_s": elapsed,
                "output_throughput": num_tokens / max(elapsed, 1e-9),
                "kv_capacity_tokens": runner.kv_capacity_tokens,
                "exit_code": 1 if failed else 0}

    def _show(self, outputs, texts, runner, num_tokens: int, elapsed: float) -> None:
        rows = []
        for i, o in enumerate(outputs):
            prompt = texts[i] if texts else str(o.prompt_token_ids)
            result = o.text if o.text is not None else str(o.token_ids)
            rows.append([i, _short(prompt), _short(result) if not o.error else f"error: {o.error}",
                         o.finish_reason])
        title = (f"{len(outputs)} request{'s' * (len(outputs) != 1)}, {num_tokens} tokens in "
                 f"{elapsed:.2f} s ({num_tokens / max(elapsed, 1e-9):.1f} tok/s)")
        print_table(title, ["#", "prompt", "output", "finish"], rows)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
