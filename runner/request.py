"""Requests and what the runner returns for them."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from enum import Enum

from runner.errors import RequestError

MIN_TEMPERATURE = 1e-5  # below it (but above 0) logits / temperature overflow: refused


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sampling_problem(params: SamplingParams) -> str | None:
    """What is wrong with `params`, in one line naming the field; None if nothing."""
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        return f"max_tokens={params.max_tokens!r}: must be an integer >= 1"
    temperature = params.temperature
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0 or (
            0 < temperature < MIN_TEMPERATURE):
        return (f"temperature={temperature!r}: must be 0 (greedy) or a finite number "
                f">= {MIN_TEMPERATURE}")
    if not _is_int(params.top_k) or params.top_k < 0:
        return f"top_k={params.top_k!r}: must be an integer >= 0 (0 = off)"
    if not _is_real(params.top_p) or not 0 < params.top_p <= 1:
        return f"top_p={params.top_p!r}: must be in (0, 1]"
    if not _is_int(params.seed):
        return f"seed={params.seed!r}: must be an integer"
    return None


def prompt_token_list(prompt) -> list[int]:
    """A prompt's token ids as a list of ints; RequestError for anything else (bools included)."""
    try:
        tokens = list(prompt)
        if any(isinstance(t, bool) for t in tokens):
            raise TypeError("a bool is not a token id")
        return [operator.index(t) for t in tokens]
    except TypeError as e:
        raise RequestError(f"prompt token ids must be a sequence of integers ({e})") from None


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    req_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each output token
    status: Status = Status.WAITING
    block_ids: list[int] = field(default_factory=list)  # virtual block ids, shared by DCP ranks
    finish_reason: str | None = None  # stop | length | error
    error: str | None = None
    num_preemptions: int = 0
    sample_key: int = 0  # keys the request's random draws (a stable hash of its prompt)
    num_inflight: int = 0  # tokens launched on the device, not read yet (async scheduling)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        """The last token read on the host (no copy of the token lists)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        """Tokens the cache holds or will hold after the steps in flight."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight


@dataclass
class TokenEvent:
    """What one step produced for one request."""

    req_id: int
    token_id: int | None  # None when the request failed without a token
    finished: bool
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    req_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None  # stop | length | error; None while the request runs
    error: str | None = None
    text: str | None = None

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason, "error": self.error}
