"""Decode Context Parallelism around any attention backend that returns the LSE.

Each rank of a DCP group stores a shard of every sequence's KV. A decode step gathers the
queries of the group's heads, attends them to the local shard, and recovers exact attention
from the partial (out, lse) pairs:
    lse = log sum_r exp(lse_r),   out = sum_r exp(lse_r - lse) * out_r
`ag_rs`: all-gather the LSEs, scale the own partial, reduce-scatter (sum) back to own heads.
`a2a`: one all-to-all of head slices with the LSE packed in, then a local N-way combine.
`fused` (perf.md §11): q already holds the group's heads (the plan replicates their projections in
the group); gather only the LSEs and return the own partial scaled by exp(lse_r - lse). The sum
over the group's ranks is left to the output projection's all-reduce.
Prefill needs no communication: fresh tokens attend their own K/V; only owners store them. Under
`fused` each rank attends only its own block of the group's heads and leaves zeros elsewhere, so
that all-reduce counts each head once.
"""
from __future__ import annotations

import os

import torch

from kernels import merge_states as merge
from runner.distributed import GroupHandle


def _kernels(t: torch.Tensor):
    on_triton = t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (merge.merge_states, merge.scale_own) if on_triton else (merge.merge_states_ref,
                                                                    merge.scale_own_ref)


class DCPAttention:
    returns_lse = True

    def __init__(self, backend, group: GroupHandle, comm: str = "ag_rs"):
        self.backend = backend
        self.group = group
        self.comm = comm

    @property
    def decode_length_buckets(self) -> tuple[int, ...]:
        return self.backend.decode_length_buckets  # rank-local lengths: the backend's own

    @property
    def decode_in_graphs(self) -> bool:
        return getattr(self.backend, "decode_in_graphs", True)

    @property
    def fused_kv_write(self) -> bool:
        return getattr(self.backend, "fused_kv_write", False)  # the slots are rank-local too

    def kv_cache_shape(self, spec, num_blocks: int, block_size: int) -> tuple:
        return self.backend.kv_cache_shape(spec, num_blocks, block_size)

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        self.backend.write_kv(k_cache, v_cache, slot_mapping, key, value)

    def prefill(self, q, k, v, meta, scale: float):
        if self.comm == "fused":
            return self._prefill_own_heads(q, k, v, meta, scale)
        return self.backend.prefill(q, k, v, meta, scale)

    def decode(self, q, k_cache, v_cache, meta, scale: float):
        if self.comm == "fused":
            return self._decode_fused(q, k_cache, v_cache, meta, scale)
        num_local_heads = q.shape[1]
        q_group = self.group.all_gather(q, dim=1)  # [R, H_loc * N, D]: rank r's heads at block r
        out, lse = self.backend.decode(q_group, k_cache, v_cache, meta, scale)
        if self.comm == "a2a":
            return self._combine_a2a(out, lse, num_local_heads)
        return self._combine_ag_rs(out, lse, num_local_heads)

    def _combine_ag_rs(self, out, lse, num_local_heads: int):
        n, r = self.group.size, self.group.rank
        lses = self.group.all_gather(lse, dim=0).view(n, *lse.shape)  # [N, R, H_loc * N]
        _, scale_own = _kernels(out)
        scaled, merged_lse = scale_own(out, lses, r)  # [R, H_loc * N, Dv]
        own = slice(r * num_local_heads, (r + 1) * num_local_heads)
        return self.group.reduce_scatter(scaled, dim=1), merged_lse[:, own]

    def _combine_a2a(self, out, lse, num_local_heads: int):
        n = self.group.size
        num_reqs, _, v_dim = out.shape
        lse_lanes = lse.contiguous().view(out.dtype).view(num_reqs, n * num_local_heads, -1)
        packed = torch.cat([out, lse_lanes], dim=-1)  # [R, N * H_loc, Dv + lanes]
        packed = packed.view(num_reqs, n, num_local_heads, -1).transpose(0, 1)  # slice j -> rank j
        received = self.group.all_to_all(packed.contiguous())  # [N, R, H_loc, Dv + lanes]
        outs = received[..., :v_dim]
        lses = received[..., v_dim:].contiguous().view(torch.float32).squeeze(-1)  # [N, R, H_loc]
        merge_states, _ = _kernels(out)
        return merge_states(outs, lses)

    def _prefill_own_heads(self, q, k, v, meta, scale: float):
        """q [T, H_loc * N, D] (the group's heads): attend block r of them; zeros elsewhere."""
        n, r = self.group.size, self.group.rank
        num_own_heads = q.shape[1] // n
        own = slice(r * num_own_heads, (r + 1) * num_own_heads)
        out_own, _ = self.backend.prefill(q[:, own], _own_kv_heads(k, n, r),
                                          _own_kv_heads(v, n, r), meta, scale)  # [T, H_loc, Dv]
        out = out_own.new_zeros(q.shape[0], q.shape[1], out_own.shape[2])  # [T, H_loc * N, Dv]
        out[:, own] = out_own
        return out, None

    def _decode_fused(self, q, k_cache, v_cache, meta, scale: float):
        """q [R, H_g, D] (the group's heads) -> this rank's partial scaled by exp(lse_r - lse)
        [R, H_g, Dv] (0 where its shard is empty) and the merged lse [R, H_g]."""
        out, lse = self.backend.decode(q, k_cache, v_cache, meta, scale)  # local shard
        lses = self.group.all_gather(lse, dim=0).view(self.group.size, *lse.shape)  # [N, R, H_g]
        _, scale_own = _kernels(out)
        return scale_own(out, lses, self.group.rank)


def _own_kv_heads(x: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """The K or V heads [T, Hkv, D] serving block r of n equal blocks of the query heads: block r
    of them, or the one KV head that block shares with others (GQA, n > Hkv)."""
    num_kv_heads = x.shape[1]
    if num_kv_heads % n == 0:
        size = num_kv_heads // n
        return x[:, r * size:(r + 1) * size]
    head = r * num_kv_heads // n
    return x[:, head:head + 1]
