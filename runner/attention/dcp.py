"""Decode Context Parallelism around any attention backend that returns the LSE.

Each rank of a DCP group stores a shard of every sequence's KV. A decode step gathers the
queries of the group's heads, attends them to the local shard, and recovers exact attention
from the partial (out, lse) pairs:
    lse = log sum_r exp(lse_r),   out = sum_r exp(lse_r - lse) * out_r
`ag_rs`: all-gather the LSEs, scale the own partial, reduce-scatter (sum) back to own heads.
`a2a`: one all-to-all of head slices with the LSE packed in, then a local N-way combine.
Prefill needs no communication: fresh tokens attend their own K/V; only owners store them.
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

    def kv_cache_shape(self, spec, num_blocks: int, block_size: int) -> tuple:
        return self.backend.kv_cache_shape(spec, num_blocks, block_size)

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        self.backend.write_kv(k_cache, v_cache, slot_mapping, key, value)

    def prefill(self, q, k, v, meta, scale: float):
        return self.backend.prefill(q, k, v, meta, scale)

    def decode(self, q, k_cache, v_cache, meta, scale: float):
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
