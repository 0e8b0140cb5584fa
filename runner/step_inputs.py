"""Step inputs: persistent decode buffers (safe to capture in a CUDA graph: every step rewrites
them in full, padding rows get slot -1 and length 0) and per-step prefill tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.forward_context import AttentionMetadata
from runner.request import Request


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [R] int64: the token whose logits each request samples from


def _block_rows(requests: list[Request], max_num_blocks: int) -> torch.Tensor:
    rows = torch.zeros(len(requests), max_num_blocks, dtype=torch.int32)  # [R, max_blocks]
    for i, request in enumerate(requests):
        rows[i, :len(request.block_ids)] = torch.tensor(request.block_ids, dtype=torch.int32)
    return rows


def prefill_inputs(requests: list[Request], block_table, max_num_blocks: int,
                   device: torch.device) -> StepInputs:
    """Every request's whole token list (prompt, plus outputs when recomputing after preemption)."""
    token_ids, positions, req_indices, starts = [], [], [], [0]
    for i, request in enumerate(requests):
        tokens = request.all_token_ids
        token_ids += tokens
        positions += range(len(tokens))
        req_indices += [i] * len(tokens)
        starts.append(starts[-1] + len(tokens))
    seq_lens = torch.tensor([r.num_tokens for r in requests], dtype=torch.int32, device=device)
    rows = _block_rows(requests, max_num_blocks).to(device)
    positions_t = torch.tensor(positions, dtype=torch.int64, device=device)
    slots = block_table.slot_mapping(
        positions_t, torch.tensor(req_indices, dtype=torch.int32, device=device), rows)
    meta = AttentionMetadata(
        is_prefill=True, slot_mapping=slots,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        query_start_loc_cpu=starts, seq_lens=seq_lens,
        local_seq_lens=block_table.local_seq_lens(seq_lens), block_table=rows,
        max_local_seq_len=block_table.max_local_len(max(r.num_tokens for r in requests)))
    return StepInputs(torch.tensor(token_ids, dtype=torch.int64, device=device), positions_t,
                      meta, meta.query_start_loc[1:].long() - 1)


class DecodeBuffers:
    """Persistent inputs of a decode step for up to `max_num_reqs` requests.

    A step is `stage` (host: token, length and block rows into pinned memory, two copies to the
    device) then `derive` (device: ids, positions, slots and rank-local lengths from the staged
    rows), which runs inside the decode graph so that a replay needs no other launch. A row
    whose token is still on the device (async scheduling) names its source: the row of the
    previous decode step, whose sampled token that step's graph left in `sampled_ids`."""

    def __init__(self, max_num_reqs: int, max_num_blocks: int, max_local_seq_len: int,
                 vocab_size: int, logits_dtype: torch.dtype, device: torch.device):
        self.max_num_reqs = max_num_reqs
        self.max_local_seq_len = max_local_seq_len  # the longest rank-local context
        self.input_ids = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)  # [Rmax]
        self.positions = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)  # [Rmax]
        self.req_indices = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)  # [Rmax]
        self.seq_lens = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)  # [Rmax]
        self.local_seq_lens = torch.zeros_like(self.seq_lens)  # [Rmax]
        self.slot_mapping = torch.full((max_num_reqs,), -1, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(max_num_reqs, max_num_blocks, dtype=torch.int32,
                                       device=device)  # [Rmax, max_blocks]
        self.query_start_loc = torch.arange(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(max_num_reqs, dtype=torch.int64, device=device)
        self.sampled_ids = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)  # [Rmax]
        # every decode step's logits, one buffer for all CUDA graphs (not one output per graph)
        self.logits = torch.empty(max_num_reqs, vocab_size, dtype=logits_dtype,
                                  device=device)  # [Rmax, V]
        # host staging (numpy views of pinned memory on a GPU): filled in Python, copied at once
        pin = device.type == "cuda"
        self._pinned_rows = torch.zeros(4, max_num_reqs, dtype=torch.int64, pin_memory=pin)
        self._pinned_table = torch.zeros(max_num_reqs, max_num_blocks, dtype=torch.int32,
                                         pin_memory=pin)
        self._host_rows = self._pinned_rows.numpy()  # [4, Rmax]: token, length, row, source row
        self._host_table = self._pinned_table.numpy()  # [Rmax, max_blocks]
        self._table_keys: list[tuple | None] = [None] * max_num_reqs  # what each row holds
        self._staged_rows = torch.zeros(4, max_num_reqs, dtype=torch.int64, device=device)
        # The last step's copies out of the pinned buffers: with async scheduling the host stages
        # step N+1 before the GPU necessarily ran step N's copies, so it waits for them first.
        self._copies_done = torch.cuda.Event() if pin else None

    def stage(self, requests: list[Request], num_padded: int,
              sources: list[int] | None = None) -> int:
        """Rows [0, num_padded): real requests first, then padding rows (token 0, length 0,
        row -1), with two host-to-device copies; returns the longest request's length.
        `sources`: each request's row in the previous decode step, whose sampled token it
        feeds (that token is still in flight).
        A block-table row is rewritten only when its request or block count changed (a running
        request's blocks only grow, until it is preempted); entries past a row's own blocks
        are never read."""
        n = len(requests)
        if self._copies_done is not None:
            self._copies_done.synchronize()  # (returns at once unless the GPU is far behind)
        rows = self._host_rows
        rows[0, :n] = [r.last_token_id for r in requests]
        rows[1, :n] = [r.num_tokens for r in requests]
        rows[2, :n] = range(n)
        rows[3, :n] = -1 if sources is None else sources
        rows[0:2, n:num_padded] = 0
        rows[2:4, n:num_padded] = -1
        for i, r in enumerate(requests):
            key = (r.req_id, r.num_preemptions, len(r.block_ids))
            if self._table_keys[i] != key:
                self._table_keys[i] = key
                self._host_table[i, :len(r.block_ids)] = r.block_ids
        self._staged_rows.copy_(self._pinned_rows, non_blocking=True)  # contiguous: one DMA
        self.block_table[:n].copy_(self._pinned_table[:n], non_blocking=True)
        if self._copies_done is not None:
            self._copies_done.record()
        return int(rows[1, :n].max()) if n else 0

    def stage_padding(self, num_padded: int) -> None:
        """Rows [0, num_padded) as padding (graph capture): slot -1, length 0."""
        self._host_rows[0:2, :num_padded] = 0
        self._host_rows[2:4, :num_padded] = -1
        self._staged_rows.copy_(self._pinned_rows)
        self.block_table[:num_padded] = 0

    def derive(self, num_padded: int, block_table) -> None:
        """Device side of a step (captured with it): every per-row input from the staged rows."""
        staged = self._staged_rows[:, :num_padded]
        source = staged[3]
        self.input_ids[:num_padded] = torch.where(
            source >= 0, self.sampled_ids[source.clamp(min=0)], staged[0])
        self.seq_lens[:num_padded] = staged[1]
        self.positions[:num_padded] = (staged[1] - 1).clamp(min=0)
        self.req_indices[:num_padded] = staged[2]
        self.slot_mapping[:num_padded] = block_table.slot_mapping(
            self.positions[:num_padded], self.req_indices[:num_padded],
            self.block_table[:num_padded])
        self.local_seq_lens[:num_padded] = block_table.local_seq_lens(self.seq_lens[:num_padded])

    def inputs(self, num_padded: int, max_local_seq_len: int) -> StepInputs:
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=self.slot_mapping[:num_padded],
            query_start_loc=self.query_start_loc[:num_padded + 1],
            query_start_loc_cpu=list(range(num_padded + 1)),
            seq_lens=self.seq_lens[:num_padded], local_seq_lens=self.local_seq_lens[:num_padded],
            block_table=self.block_table[:num_padded], max_local_seq_len=max_local_seq_len)
        return StepInputs(self.input_ids[:num_padded], self.positions[:num_padded], meta,
                          self.logits_indices[:num_padded])
