"""Each row's greedy summary of fp32 logits in one pass: the argmax (the lowest index among equal
maxima), the max, and the log-sum-exp (online over column chunks, in fp32). A decode step of a
102400-token vocabulary otherwise launches a max, the four kernels of torch.logsumexp and a
stack, each reading the [R, V] logits again."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns per loop step


@triton.jit
def _greedy_summary_kernel(logits_ptr, out_ptr, vocab_size, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_id = tl.zeros([], dtype=tl.int32)
    total = tl.zeros([], dtype=tl.float32)  # sum of exp(x - best) so far
    for start in range(0, vocab_size, BLOCK):
        cols = start + offsets
        x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < vocab_size,
                    other=float("-inf"))
        chunk_best = tl.max(x, axis=0)
        chunk_id = tl.min(tl.where(x == chunk_best, cols, vocab_size), axis=0)
        best_id = tl.where(chunk_best > best, chunk_id, best_id)  # ties keep the earlier id
        new_best = tl.maximum(best, chunk_best)
        finite = new_best > float("-inf")  # all -inf so far: nothing to rescale or add
        total = tl.where(finite, total * tl.exp(best - new_best), 0.0)
        total += tl.sum(tl.where(x > float("-inf"), tl.exp(x - new_best), 0.0), axis=0)
        best = new_best
    tl.store(out_ptr + row * 3, best_id.to(tl.float64))
    tl.store(out_ptr + row * 3 + 1, best.to(tl.float64))
    tl.store(out_ptr + row * 3 + 2, (best + tl.log(total)).to(tl.float64))


def greedy_summary(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] fp32 (unit column stride) -> [R, 3] fp64: argmax id, max, log-sum-exp."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"greedy_summary: logits must be [R, V] float32 with unit column "
                         f"stride; got {tuple(logits.shape)} {logits.dtype}")
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, 3, dtype=torch.float64, device=logits.device)
    if num_rows:
        _greedy_summary_kernel[(num_rows,)](logits, out, vocab_size, logits.stride(0),
                                            BLOCK=min(BLOCK, triton.next_power_of_2(vocab_size)))
    return out


def greedy_summary_ref(logits: torch.Tensor) -> torch.Tensor:
    best, lse = logits.max(dim=-1), torch.logsumexp(logits, dim=-1)  # [R] each
    return torch.stack([best.indices.double(), best.values.double(), lse.double()], dim=1)
