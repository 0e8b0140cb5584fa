"""Each row's greedy summary of logits: the argmax (the lowest index among equal maxima), the max,
and the log-sum-exp, in fp32 from logits of any float dtype. Two launches: programs (row, chunk)
reduce CHUNK columns each, one program per row merges its chunks: 14 + 2 us per decode step for
128 rows of DeepSeek-V2-Lite's 102400 bf16 logits on an H200, where one program per row walking
the whole row took ~70 us for Qwen's 151936 fp32 logits (each column block waited on its load)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_previous_kernel

BLOCK = 4096  # columns per loop step
CHUNK = 8192  # columns per program of the first launch (a multiple of BLOCK)


@triton.jit
def _chunk_summary_kernel(logits_ptr, best_ptr, best_id_ptr, total_ptr, vocab_size, row_stride,
                          num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
    """Program (row, chunk): the chunk's max, its lowest argmax and sum(exp(x - max))."""
    wait_for_previous_kernel(PDL)
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offsets = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_id = tl.zeros([], dtype=tl.int32)
    total = tl.zeros([], dtype=tl.float32)  # sum of exp(x - best) so far
    for start in tl.static_range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + start + offsets
        x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < vocab_size,
                    other=float("-inf")).to(tl.float32)
        block_best = tl.max(x, axis=0)
        block_id = tl.min(tl.where(x == block_best, cols, vocab_size), axis=0)
        best_id = tl.where(block_best > best, block_id, best_id)  # ties keep the earlier id
        new_best = tl.maximum(best, block_best)
        finite = new_best > float("-inf")  # all -inf so far: nothing to rescale or add
        total = tl.where(finite, total * tl.exp(best - new_best), 0.0)
        total += tl.sum(tl.where(x > float("-inf"), tl.exp(x - new_best), 0.0), axis=0)
        best = new_best
    part = row * num_chunks + chunk
    tl.store(best_ptr + part, best)
    tl.store(best_id_ptr + part, best_id)
    tl.store(total_ptr + part, total)


@triton.jit
def _merge_chunks_kernel(best_ptr, best_id_ptr, total_ptr, out_ptr, ids_out_ptr, num_chunks,
                         vocab_size, BLOCK_C: tl.constexpr, WRITE_IDS: tl.constexpr,
                         PDL: tl.constexpr):
    """Program row: merges its chunks into out[row] = (argmax, max, log-sum-exp) in fp64, and the
    argmax into ids_out[row] (int64) when WRITE_IDS."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK_C)
    mask = chunks < num_chunks
    best = tl.load(best_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    best_id = tl.load(best_id_ptr + row * num_chunks + chunks, mask=mask, other=vocab_size)
    total = tl.load(total_ptr + row * num_chunks + chunks, mask=mask, other=0.0)
    row_best = tl.max(best, axis=0)
    # chunks cover increasing columns, so the lowest id among the best chunks is the row's first
    row_id = tl.min(tl.where(best == row_best, best_id, vocab_size), axis=0)
    row_id = tl.where(row_best > float("-inf"), row_id, 0)  # all -inf: id 0, as torch
    finite = best > float("-inf")
    row_total = tl.sum(tl.where(finite, total * tl.exp(best - row_best), 0.0), axis=0)
    tl.store(out_ptr + row * 3, row_id.to(tl.float64))
    tl.store(out_ptr + row * 3 + 1, row_best.to(tl.float64))
    tl.store(out_ptr + row * 3 + 2, (row_best + tl.log(row_total)).to(tl.float64))
    if WRITE_IDS:
        tl.store(ids_out_ptr + row, row_id.to(tl.int64))


def greedy_summary(logits: torch.Tensor, ids_out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [R, V] float32/bfloat16/float16 (unit column stride) -> [R, 3] fp64: argmax id,
    max, log-sum-exp (computed in fp32). `ids_out` [R] int64, if given, also receives the argmax."""
    if (logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or logits.stride(-1) != 1):
        raise ValueError(f"greedy_summary: logits must be [R, V] float32, bfloat16 or float16 "
                         f"with unit column stride; got {tuple(logits.shape)} {logits.dtype}")
    num_rows, vocab_size = logits.shape
    if ids_out is not None and (tuple(ids_out.shape) != (num_rows,)
                                or ids_out.dtype != torch.int64):
        raise ValueError(f"greedy_summary: ids_out must be [{num_rows}] int64; got "
                         f"{tuple(ids_out.shape)} {ids_out.dtype}")
    out = torch.empty(num_rows, 3, dtype=torch.float64, device=logits.device)
    if not num_rows:
        return out
    block = min(BLOCK, triton.next_power_of_2(vocab_size))
    chunk = min(CHUNK, triton.cdiv(vocab_size, block) * block)
    num_chunks = triton.cdiv(vocab_size, chunk)
    best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_id = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    total = torch.empty_like(best)
    launch = dependent_launch(logits.device)
    _chunk_summary_kernel[(num_rows, num_chunks)](
        logits, best, best_id, total, vocab_size, logits.stride(0), num_chunks,
        CHUNK=chunk, BLOCK=block, **launch)
    _merge_chunks_kernel[(num_rows,)](
        best, best_id, total, out, out if ids_out is None else ids_out, num_chunks, vocab_size,
        BLOCK_C=triton.next_power_of_2(num_chunks), WRITE_IDS=ids_out is not None, **launch)
    return out


def greedy_summary_ref(logits: torch.Tensor, ids_out: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Plain-torch `greedy_summary` (in fp32 for any input dtype)."""
    logits = logits.float()
    best, lse = logits.max(dim=-1), torch.logsumexp(logits, dim=-1)  # [R] each
    if ids_out is not None:
        ids_out.copy_(best.indices)
    return torch.stack([best.indices.double(), best.values.double(), lse.double()], dim=1)
