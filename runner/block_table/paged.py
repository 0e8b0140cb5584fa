"""Paged KV layout: which rank stores each token, and where (DESIGN.md §5).

Allocation is in virtual blocks of `block_size * cp_size` tokens; every DCP rank holds
`block_size` of them in its physical block with the same id, so the block table is shared.
With cp_size 1 this is an ordinary paged block table.
"""
from __future__ import annotations

import os

import torch

from kernels import slot_mapping as kernels


def _use_triton(t: torch.Tensor) -> bool:
    # NOTE: a CPU run never reaches Triton unless the interpreter is asked for explicitly.
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class PagedBlockTable:
    def __init__(self, block_size: int = 16, interleave: int = 1, num_blocks: int | None = None,
                 memory_fraction: float = 0.9, cp_size: int = 1, cp_rank: int = 0):
        self.block_size = block_size
        self.interleave = interleave
        self.num_blocks = num_blocks  # per rank; None: sized from memory
        self.memory_fraction = memory_fraction
        self.cp_size = cp_size
        self.cp_rank = cp_rank

    @property
    def virtual_block_size(self) -> int:
        return self.block_size * self.cp_size

    def slot_mapping(self, positions: torch.Tensor, req_indices: torch.Tensor,
                     block_table: torch.Tensor) -> torch.Tensor:
        """positions [T] int64, req_indices [T] (-1: padding), block_table [R, max_blocks] int32
        -> slots [T] int64, -1 where this rank does not store the token."""
        fn = kernels.slot_mapping if _use_triton(positions) else kernels.slot_mapping_ref
        return fn(positions, req_indices, block_table, self.block_size, self.cp_size,
                  self.cp_rank, self.interleave)

    def local_seq_lens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[R] int32 global lengths -> [R] int32 tokens stored on this rank."""
        if self.cp_size == 1:
            return seq_lens
        fn = kernels.local_seq_lens if _use_triton(seq_lens) else kernels.local_seq_lens_ref
        return fn(seq_lens, self.cp_size, self.cp_rank, self.interleave)

    def max_local_len(self, max_len: int) -> int:
        """Upper bound of a rank's share of a `max_len`-token sequence."""
        n, i = self.cp_size, self.interleave
        return -(-max_len // (n * i)) * i
