"""The parallel plan: sizes, ranks, process groups and sharding rules for tp, dcp and ep.

Rank layout: the world is one TP group of `tp` ranks; DCP groups are runs of `dcp` adjacent
ranks inside it (vLLM's rule: DCP reuses TP ranks and adds none). EP, when on, shards experts
over the same ranks. This is the only component that knows DCP exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from runner.distributed import COLLECTIVE_TIMEOUT, GroupHandle

DCP_COMM_MODES = ("ag_rs", "a2a", "fused")


@dataclass
class HeadShard:
    """Which attention heads this rank computes: [offset, offset + num_heads)."""

    num_heads: int
    offset: int


class ParallelPlan:
    def __init__(self, tp: int = 1, dcp: int = 1, ep: bool = False, dcp_comm: str = "fused",
                 backend: str = "auto"):
        self.tp_size = tp
        self.dcp_size = dcp
        self.ep = ep
        self.dcp_comm = dcp_comm
        self.backend = backend
        self.world_rank = 0
        self.tp = GroupHandle()
        self.dcp = GroupHandle()

    @property
    def world_size(self) -> int:
        return self.tp_size

    @property
    def is_driver(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.world_rank == 0

    def setup(self, world_rank: int) -> None:
        """Create the process groups (after `dist.init_process_group`, before any capture).
        Every rank calls `new_group` for every group, in the same order."""
        self.world_rank = world_rank
        if self.world_size == 1:
            return
        tp_group = dist.new_group(list(range(self.tp_size)), timeout=COLLECTIVE_TIMEOUT)
        self.tp = GroupHandle(self.tp_size, world_rank, tp_group)
        for start in range(0, self.tp_size, self.dcp_size):
            ranks = list(range(start, start + self.dcp_size))
            group = (dist.new_group(ranks, timeout=COLLECTIVE_TIMEOUT) if self.dcp_size > 1
                     else None)
            if world_rank in ranks:
                self.dcp = GroupHandle(self.dcp_size, world_rank - start, group)

    # --- what the components see -------------------------------------------------------------
    @property
    def cp_size(self) -> int:
        return self.dcp_size

    @property
    def cp_rank(self) -> int:
        return self.dcp.rank

    def attention_heads(self, num_heads: int) -> HeadShard:
        """The query heads this rank projects, attends and feeds to its output projection: its
        TP split, or under `dcp_comm=fused` its DCP group's (the union of the group's TP splits,
        replicated in the group; the o_proj all-reduce sums the group's key shards)."""
        per_rank = num_heads // self.tp_size
        if self.dcp_comm != "fused":
            return HeadShard(per_rank, self.tp.rank * per_rank)
        per_group = per_rank * self.dcp_size
        return HeadShard(per_group, (self.tp.rank // self.dcp_size) * per_group)

    def kv_heads(self, num_kv_heads: int) -> HeadShard:
        """GQA KV heads: split over tp, or replicated in contiguous rank sets when tp > heads."""
        if self.tp_size <= num_kv_heads:
            local = num_kv_heads // self.tp_size
            return HeadShard(local, self.tp.rank * local)
        ranks_per_head = self.tp_size // num_kv_heads
        return HeadShard(1, self.tp.rank // ranks_per_head)

    def wrap_attention(self, backend):
        """The backend the model calls: itself, or under DCP the combine of the comm mode (query
        gather + LSE combine, or under `fused` the LSE gather + own-partial scaling)."""
        if self.dcp_size == 1:
            return backend
        from runner.attention.dcp import DCPAttention
        return DCPAttention(backend, self.dcp, self.dcp_comm)

    def describe(self) -> dict:
        return {"tp": self.tp_size, "dcp": self.dcp_size, "ep": self.ep,
                "comm": self.dcp_comm if self.dcp_size > 1 else "-"}
