"""Token sampling: greedy, temperature, top-k, top-p. Random draws are keyed by
(seed, the request's prompt, output index), so a token never depends on batching, preemption,
the request's position among others or the parallel layout."""
from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass

import torch

from kernels.greedy_summary import greedy_summary, greedy_summary_ref
from runner.request import SamplingParams


@dataclass
class StepLogits:
    """What a forward hands the sampler (on the device; a decode step's come out of its graph)."""

    logits: torch.Tensor  # [R, V] in the model's dtype
    greedy: torch.Tensor  # [R, 3] fp64: argmax token id, its logit, logsumexp of the row

    def rows(self, num_rows: int) -> StepLogits:
        return StepLogits(self.logits[:num_rows], self.greedy[:num_rows])


def step_logits(logits: torch.Tensor, ids_out: torch.Tensor | None = None) -> StepLogits:
    """logits [R, V] -> the logits with each row's greedy summary, computed in fp32 on the device
    (Triton on a GPU; ties go to the lowest token id); `ids_out` [R] int64 also gets the argmax."""
    summary = greedy_summary if logits.is_cuda else greedy_summary_ref
    return StepLogits(logits, summary(logits, ids_out))


def prompt_key(prompt_token_ids: list[int]) -> int:
    """A stable 32-bit key of a prompt (not Python's hash(): that differs per process)."""
    return zlib.crc32(array("q", prompt_token_ids).tobytes())


def _draw(seed: int, request_key: int, output_index: int) -> float:
    """A uniform number in [0, 1) that depends only on its key (any seed: the key is taken modulo
    2^64, as torch takes negative seeds)."""
    key = (seed * 1_000_003 + request_key) * 1_000_003 + output_index
    generator = torch.Generator().manual_seed(key % (1 << 64))
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] fp32 logits -> [V] fp64 probabilities after temperature, top-k and top-p."""
    logits = logits.double() / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of better tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs / probs.sum()


def greedy_tokens(greedy: torch.Tensor) -> tuple[list[int], list[float]]:
    """A greedy summary on the host [R, 3] -> (argmax token per row, its log-probability)."""
    return greedy[:, 0].long().tolist(), (greedy[:, 1] - greedy[:, 2]).tolist()


def sample(step: StepLogits, params: list[SamplingParams], request_keys: list[int],
           output_indices: list[int]) -> tuple[list[int], list[float]]:
    """-> (token per row, its log-probability under the unfiltered model).
    One device-to-host transfer for greedy rows; sampled rows bring their logits to the host."""
    host = step.greedy.cpu()  # [R, 3]
    tokens, logprobs = greedy_tokens(host)
    for row, p in enumerate(params):
        if p.temperature <= 0:
            continue
        row_logits = step.logits[row].cpu()
        probs = _filtered_probs(row_logits, p)
        u = _draw(p.seed, request_keys[row], output_indices[row])
        cdf = torch.cumsum(probs, 0)
        token = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype))),
                    probs.shape[0] - 1)
        tokens[row] = token
        logprobs[row] = float(row_logits[token].double() - host[row, 2])
    return tokens, logprobs
