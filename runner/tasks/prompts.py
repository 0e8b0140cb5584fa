"""Where a task's prompts come from: token ids, text (with the checkpoint's tokenizer), a JSONL
file, or seeded demo prompts."""
from __future__ import annotations

import json
import random

from runner.errors import RunnerError

DEMO_TEXTS = ["The capital of France is", "def fibonacci(n):",
              "In a distant galaxy, a small robot", "1, 1, 2, 3, 5, 8,"]
FILE_KEYS = ("prompt", "prompt_token_ids")


def _encode(tokenizer, text: str) -> list[int]:
    # NOTE: no special tokens (no BOS) are added, as for prompt_token_ids.
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_token_ids(token_ids, where: str) -> list[int]:
    """`token_ids` as a list of plain ints (bool, float, str refused), else a RunnerError for
    `where` (e.g. "task.prompts_file line 3")."""
    if not isinstance(token_ids, (list, tuple)):
        raise RunnerError(f"{where}: prompt_token_ids must be a list of int, got "
                          f"{type(token_ids).__name__}")
    for token in token_ids:
        if type(token) is not int:  # bool is a subclass of int: refused too
            raise RunnerError(f"{where}: token id {json.dumps(token)} is not an int "
                              f"(prompt_token_ids must be a list of int)")
    return list(token_ids)


def read_prompts_file(path: str) -> list[list[int] | str]:
    """JSONL, one request per line: {"prompt": "text"} or {"prompt_token_ids": [ints]}. Token
    ids per line, or the text to encode once the tokenizer is known."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RunnerError(f"task.prompts_file={path!r}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RunnerError(f"task.prompts_file={path!r}: not UTF-8 text (byte {e.start}); "
                          f"give JSONL in UTF-8") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"task.prompts_file line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunnerError(f"{where}: not valid JSON") from None
        if not isinstance(record, dict):
            raise RunnerError(f"{where}: expected {{\"prompt\": str}} or "
                              f"{{\"prompt_token_ids\": [int]}}")
        unknown = sorted(set(record) - set(FILE_KEYS))
        if unknown:
            raise RunnerError(f"{where}: unknown key {unknown[0]!r}; allowed {list(FILE_KEYS)}")
        if len(record) != 1:
            raise RunnerError(f"{where}: give exactly one of {list(FILE_KEYS)}")
        if "prompt_token_ids" in record:
            prompts.append(check_token_ids(record["prompt_token_ids"], where))
        elif isinstance(record["prompt"], str):
            prompts.append(record["prompt"])
        else:
            raise RunnerError(f"{where}: \"prompt\" must be a string, got "
                              f"{type(record['prompt']).__name__}")
    return prompts


def check_prompt_sources(prompts, prompt_token_ids, prompts_file) -> None:
    """At most one of the three prompt sources."""
    given = [x is not None for x in (prompts, prompt_token_ids, prompts_file)]
    if sum(given) > 1:
        raise RunnerError("give only one of task.prompts, task.prompt_token_ids, task.prompts_file")


def resolve_prompts(prompts, prompt_token_ids, file_prompts, tokenizer, vocab_size: int,
                    seed: int) -> tuple[list[list[int]], list[str] | None]:
    """(token ids per prompt, display text per prompt or None). `file_prompts` is what
    read_prompts_file returned; at most one source is given (checked by the task)."""
    if prompt_token_ids is not None:
        return [list(p) for p in prompt_token_ids], None
    if file_prompts is not None:
        if tokenizer is None and any(isinstance(p, str) for p in file_prompts):
            raise RunnerError("task.prompts_file has text prompts but model.path has no "
                              "tokenizer: give prompt_token_ids")
        return ([p if isinstance(p, list) else _encode(tokenizer, p) for p in file_prompts],
                [p if isinstance(p, str) else str(p) for p in file_prompts])
    if prompts is not None:
        if tokenizer is None:
            raise RunnerError("task.prompts needs a tokenizer at model.path: give "
                              "task.prompt_token_ids instead")
        return [_encode(tokenizer, p) for p in prompts], list(prompts)
    if tokenizer is not None:
        return [_encode(tokenizer, p) for p in DEMO_TEXTS], list(DEMO_TEXTS)
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in (3, 8, 21, 40)], None
