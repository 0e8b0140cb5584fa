"""A user block table: a fixed allocation unit whatever the DCP size, and a count of the slots
it maps.

PagedBlockTable keeps `block_size` tokens per rank, so each allocated block covers
block_size * dcp tokens. This policy keeps the allocated block at `virtual_block_size` tokens
and gives each DCP rank virtual_block_size / dcp of them. A functools.partial lets the parallel
plan add cp_size and cp_rank, as it does for the configured table.

Run: python examples/block_table.py
"""
from __future__ import annotations

import functools

from runner import RunnerError, build_runner, compose_config
from runner.block_table.paged import PagedBlockTable

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


class FixedVirtualBlockTable(PagedBlockTable):
    """Blocks of `virtual_block_size` tokens over the DCP group; counts mapped slots."""

    def __init__(self, virtual_block_size: int = 8, cp_size: int = 1, cp_rank: int = 0,
                 **kwargs) -> None:
        if virtual_block_size % cp_size:
            raise RunnerError(f"virtual_block_size={virtual_block_size}: must be a multiple "
                              f"of the DCP size {cp_size}")
        super().__init__(block_size=virtual_block_size // cp_size, cp_size=cp_size,
                         cp_rank=cp_rank, **kwargs)
        self.num_slots_mapped = 0

    def slot_mapping(self, positions, req_indices, block_table):
        slots = super().slot_mapping(positions, req_indices, block_table)  # [T] int64
        self.num_slots_mapped += int((slots >= 0).sum())
        return slots


def main(max_tokens: int = 8) -> tuple[list[list[int]], PagedBlockTable]:
    """Greedy tokens per prompt and the runner's block table."""
    cfg = compose_config(["model=tiny", "device=cpu"])
    table = functools.partial(FixedVirtualBlockTable, virtual_block_size=8)
    runner = build_runner(cfg, block_table=table)
    outputs = runner.generate(prompt_token_ids=PROMPTS, max_tokens=max_tokens)
    bt = runner.block_table
    print(f"block_size={bt.block_size} per rank, {runner.num_blocks} blocks, "
          f"{bt.num_slots_mapped} slots mapped")
    for o in outputs:
        print(f"{o.prompt_token_ids} -> {o.token_ids}")
    return [o.token_ids for o in outputs], bt


if __name__ == "__main__":
    main()
