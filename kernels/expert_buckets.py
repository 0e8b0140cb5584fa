"""Token-expert pairs grouped by expert for the fused MoE's grouped GEMMs: one bucket per expert,
filled with atomic counters. The router's top-k kernel fills them as it picks the experts (no
separate sorting launch in a decode step); `bucket_by_expert` fills them from given ids.

Pair p is (token p // K, choice p % K). Each GEMM program takes one block of BLOCK_M rows: the
blocks are every expert's bucket cut into BLOCK_M rows, experts in order, so the used blocks come
first and the programs past them (sized for the worst case: no host sync) only exit. A bucket's
order depends on the atomics' order; the GEMM rows are independent, so results do not."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class ExpertBuckets:
    counts: torch.Tensor  # [E] int32: pairs routed to each expert; zero before filling
    pairs: torch.Tensor  # [E, P] int32: bucket e's first counts[e] entries are its pairs

    @classmethod
    def empty(cls, num_experts: int, num_pairs: int, device: torch.device) -> ExpertBuckets:
        """Uninitialised: the router zeroes counts before it fills them (moe_route)."""
        return cls(torch.empty(num_experts, dtype=torch.int32, device=device),
                   torch.empty(num_experts, num_pairs, dtype=torch.int32, device=device))

    def check(self, num_experts: int, num_pairs: int, device: torch.device) -> None:
        if (self.counts.shape != (num_experts,) or self.pairs.shape != (num_experts, num_pairs)
                or self.counts.dtype != torch.int32 or self.pairs.dtype != torch.int32
                or not self.pairs.is_contiguous()
                or {self.counts.device, self.pairs.device} != {device}):
            raise ValueError(
                f"buckets must hold counts [E={num_experts}] and contiguous pairs "
                f"[E={num_experts}, P={num_pairs}], int32 on {device}; got "
                f"{tuple(self.counts.shape)} {self.counts.dtype} and "
                f"{tuple(self.pairs.shape)} {self.pairs.dtype}")


def max_row_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Row blocks over any routing: every non-empty bucket (at most min(E, P)) adds < block_m
    padding rows."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


@triton.jit
def add_to_buckets(ids, pairs, mask, num_experts, counts_ptr, buckets_ptr, bucket_size):
    """Appends pairs (any shape, with their expert ids) to their experts' buckets; ids outside
    [0, num_experts) and masked pairs are dropped. A device function of the router's top-k and
    of _bucket_kernel."""
    keep = mask & (ids >= 0) & (ids < num_experts)
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=keep, sem="relaxed")
    tl.store(buckets_ptr + ids.to(tl.int64) * bucket_size + rank, pairs, mask=keep)


@triton.jit
def bucket_rows(block, counts_ptr, buckets_ptr, num_experts, bucket_size,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row block `block` -> (expert, its pairs [BLOCK_M] (0 in padding rows), row mask
    [BLOCK_M]); expert >= num_experts for the unused blocks past the last bucket."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)  # [BE]
    num_blocks = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(num_blocks, axis=0)  # [BE]: one past each expert's last block
    expert = tl.sum((ends <= block).to(tl.int32), axis=0)  # the first bucket ending after it
    own = experts == expert
    first_block = tl.sum(tl.where(own, ends - num_blocks, 0), axis=0)
    count = tl.sum(tl.where(own, counts, 0), axis=0)
    ranks = (block - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = ranks < count
    pairs = tl.load(buckets_ptr + expert.to(tl.int64) * bucket_size + ranks, mask=row_mask,
                    other=0)
    return expert, pairs, row_mask


@triton.jit(do_not_specialize=["num_pairs"])
def _bucket_kernel(ids_ptr, counts_ptr, buckets_ptr, num_pairs, num_experts,
                   BLOCK: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=mask, other=-1)
    add_to_buckets(ids, pairs, mask, num_experts, counts_ptr, buckets_ptr, num_pairs)


def bucket_by_expert(flat_ids: torch.Tensor, num_experts: int) -> ExpertBuckets:
    """flat_ids [P] contiguous expert ids (outside [0, E): dropped) -> filled buckets."""
    num_pairs = flat_ids.numel()
    buckets = ExpertBuckets(torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device),
                            torch.empty(num_experts, num_pairs, dtype=torch.int32,
                                        device=flat_ids.device))
    if num_pairs:
        block = min(1024, triton.next_power_of_2(num_pairs))
        _bucket_kernel[(triton.cdiv(num_pairs, block),)](
            flat_ids, buckets.counts, buckets.pairs, num_pairs, num_experts, BLOCK=block)
    return buckets
