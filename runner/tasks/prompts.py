"""Where a task's prompts come from: token ids, text (with the checkpoint's tokenizer), a JSONL
file, or seeded demo prompts."""
from __future__ import annotations

import json
import random

from runner.errors import RunnerError

DEMO_TEXTS = ["The capital of France is", "def fibonacci(n):",
              "In a distant galaxy, a small robot", "1, 1, 2, 3, 5, 8,"]


def _encode(tokenizer, text: str) -> list[int]:
    # NOTE: no special tokens (no BOS) are added, as for prompt_token_ids.
    return list(tokenizer.encode(text, add_special_tokens=False))


def read_prompts_file(path: str, tokenizer) -> list[list[int]]:
    """JSONL, one request per line: {"prompt": "text"} or {"prompt_token_ids": [ints]}."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise RunnerError(f"task.prompts_file={path!r}: cannot read ({e.strerror})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunnerError(f"task.prompts_file line {number}: not valid JSON") from None
        if isinstance(record, dict) and isinstance(record.get("prompt_token_ids"), list):
            prompts.append([int(t) for t in record["prompt_token_ids"]])
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            if tokenizer is None:
                raise RunnerError("task.prompts_file has text prompts but model.path has no "
                                  "tokenizer: give prompt_token_ids")
            prompts.append(_encode(tokenizer, record["prompt"]))
        else:
            raise RunnerError(f"task.prompts_file line {number}: expected {{\"prompt\": str}} or "
                              f"{{\"prompt_token_ids\": [int]}}")
    return prompts


def resolve_prompts(prompts, prompt_token_ids, prompts_file, tokenizer, vocab_size: int,
                    seed: int) -> tuple[list[list[int]], list[str] | None]:
    """(token ids per prompt, display text per prompt or None)."""
    given = [x is not None for x in (prompts, prompt_token_ids, prompts_file)]
    if sum(given) > 1:
        raise RunnerError("give only one of task.prompts, task.prompt_token_ids, task.prompts_file")
    if prompt_token_ids is not None:
        return [[int(t) for t in p] for p in prompt_token_ids], None
    if prompts_file is not None:
        return read_prompts_file(prompts_file, tokenizer), None
    if prompts is not None:
        if tokenizer is None:
            raise RunnerError("task.prompts needs a tokenizer at model.path: give "
                              "task.prompt_token_ids instead")
        return [_encode(tokenizer, p) for p in prompts], list(prompts)
    if tokenizer is not None:
        return [_encode(tokenizer, p) for p in DEMO_TEXTS], list(DEMO_TEXTS)
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in (3, 8, 21, 40)], None
