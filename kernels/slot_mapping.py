"""DCP KV layout kernels: token position -> this rank's cache slot (-1 if another rank owns it),
and the number of a sequence's tokens stored on this rank. cp_size=1 is the plain paged layout."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 1024  # tokens (or requests) per program


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every batch size
def _slot_mapping_kernel(positions_ptr, req_indices_ptr, block_table_ptr, slots_ptr,
                         num_tokens, max_num_blocks, table_stride_r, table_stride_b, cp_rank,
                         BLOCK_SIZE: tl.constexpr, CP_SIZE: tl.constexpr,
                         INTERLEAVE: tl.constexpr, TILE: tl.constexpr):
    offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
    in_range = offs < num_tokens
    pos = tl.load(positions_ptr + offs, mask=in_range, other=0).to(tl.int64)
    req = tl.load(req_indices_ptr + offs, mask=in_range, other=-1).to(tl.int64)
    virtual_block = pos // (BLOCK_SIZE * CP_SIZE)
    virtual_offset = pos % (BLOCK_SIZE * CP_SIZE)
    owner = (virtual_offset // INTERLEAVE) % CP_SIZE
    local = (virtual_offset // (INTERLEAVE * CP_SIZE)) * INTERLEAVE + virtual_offset % INTERLEAVE
    mine = (in_range & (req >= 0) & (pos >= 0) & (virtual_block < max_num_blocks)
            & (owner == cp_rank))
    block = tl.load(block_table_ptr + req * table_stride_r + virtual_block * table_stride_b,
                    mask=mine, other=0).to(tl.int64)
    tl.store(slots_ptr + offs, tl.where(mine, block * BLOCK_SIZE + local, -1), mask=in_range)


@triton.jit(do_not_specialize=["num_reqs"])
def _local_seq_lens_kernel(seq_lens_ptr, local_lens_ptr, num_reqs, cp_rank,
                           CP_SIZE: tl.constexpr, INTERLEAVE: tl.constexpr, TILE: tl.constexpr):
    offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
    in_range = offs < num_reqs
    seq_len = tl.load(seq_lens_ptr + offs, mask=in_range, other=0)
    rounds = seq_len // (CP_SIZE * INTERLEAVE)
    tail = tl.minimum(tl.maximum(seq_len % (CP_SIZE * INTERLEAVE) - cp_rank * INTERLEAVE, 0),
                      INTERLEAVE)
    tl.store(local_lens_ptr + offs, rounds * INTERLEAVE + tail, mask=in_range)


def _check_layout(cp_size: int, cp_rank: int, interleave: int) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size) with cp_size >= 1, got "
                         f"cp_size={cp_size} cp_rank={cp_rank}")
    if interleave < 1:
        raise ValueError(f"interleave must be >= 1, got {interleave}")


def _check_slot_inputs(positions: torch.Tensor, req_indices: torch.Tensor,
                       block_table: torch.Tensor, block_size: int, cp_size: int, cp_rank: int,
                       interleave: int) -> None:
    _check_layout(cp_size, cp_rank, interleave)
    if block_size < 1 or block_size % interleave:
        raise ValueError(f"block_size must be a positive multiple of interleave={interleave}, "
                         f"got {block_size}")
    if positions.dim() != 1 or positions.dtype != torch.int64 or not positions.is_contiguous():
        raise ValueError(f"positions must be contiguous [T] int64, got {tuple(positions.shape)} "
                         f"{positions.dtype}")
    if (req_indices.shape != positions.shape or not req_indices.is_contiguous()
            or req_indices.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"req_indices must be contiguous [T={positions.shape[0]}] int32/int64, "
                         f"got {tuple(req_indices.shape)} {req_indices.dtype}")
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be [R, max_num_blocks] int32, got "
                         f"{tuple(block_table.shape)} {block_table.dtype}")
    if not positions.device == req_indices.device == block_table.device:
        raise ValueError(f"positions, req_indices and block_table must share a device, got "
                         f"{positions.device}, {req_indices.device}, {block_table.device}")


def slot_mapping(positions: torch.Tensor, req_indices: torch.Tensor, block_table: torch.Tensor,
                 block_size: int, cp_size: int = 1, cp_rank: int = 0,
                 interleave: int = 1) -> torch.Tensor:
    """Cache slot of each token on rank `cp_rank` of `cp_size`: [T] int64, -1 where another rank
    owns the token, for padding tokens (req_indices -1) and past the end of the table row.

    positions [T] int64, req_indices [T] (block-table row of each token), block_table
    [R, max_num_blocks] int32 of virtual blocks of block_size * cp_size tokens.
    """
    _check_slot_inputs(positions, req_indices, block_table, block_size, cp_size, cp_rank,
                       interleave)
    slots = torch.empty_like(positions)  # [T] int64
    num_tokens = positions.shape[0]
    if num_tokens:
        _slot_mapping_kernel[(triton.cdiv(num_tokens, _TILE),)](
            positions, req_indices, block_table, slots, num_tokens, block_table.shape[1],
            block_table.stride(0), block_table.stride(1), cp_rank,
            BLOCK_SIZE=block_size, CP_SIZE=cp_size, INTERLEAVE=interleave, TILE=_TILE)
    return slots


def slot_mapping_ref(positions: torch.Tensor, req_indices: torch.Tensor,
                     block_table: torch.Tensor, block_size: int, cp_size: int = 1,
                     cp_rank: int = 0, interleave: int = 1) -> torch.Tensor:
    """Plain-torch `slot_mapping` (same arguments, same result)."""
    _check_slot_inputs(positions, req_indices, block_table, block_size, cp_size, cp_rank,
                       interleave)
    req = req_indices.long()
    virtual_block = positions // (block_size * cp_size)
    virtual_offset = positions % (block_size * cp_size)
    owner = (virtual_offset // interleave) % cp_size
    local = (virtual_offset // (interleave * cp_size)) * interleave + virtual_offset % interleave
    mine = ((req >= 0) & (positions >= 0) & (virtual_block < block_table.shape[1])
            & (owner == cp_rank))
    block = block_table[req.clamp(min=0), virtual_block.clamp(0, block_table.shape[1] - 1)]
    return torch.where(mine, block.long() * block_size + local, -1)


def _check_seq_lens(seq_lens: torch.Tensor) -> None:
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens must be contiguous [R] int32, got {tuple(seq_lens.shape)} "
                         f"{seq_lens.dtype}")


def local_seq_lens(seq_lens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0,
                   interleave: int = 1) -> torch.Tensor:
    """Tokens of each sequence that rank `cp_rank` stores: seq_lens [R] int32 -> [R] int32."""
    _check_layout(cp_size, cp_rank, interleave)
    _check_seq_lens(seq_lens)
    local_lens = torch.empty_like(seq_lens)  # [R] int32
    num_reqs = seq_lens.shape[0]
    if num_reqs:
        _local_seq_lens_kernel[(triton.cdiv(num_reqs, _TILE),)](
            seq_lens, local_lens, num_reqs, cp_rank,
            CP_SIZE=cp_size, INTERLEAVE=interleave, TILE=_TILE)
    return local_lens


def local_seq_lens_ref(seq_lens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0,
                       interleave: int = 1) -> torch.Tensor:
    """Plain-torch `local_seq_lens`."""
    _check_layout(cp_size, cp_rank, interleave)
    _check_seq_lens(seq_lens)
    span = cp_size * interleave
    tail = (seq_lens % span - cp_rank * interleave).clamp(0, interleave)
    return (seq_lens // span * interleave + tail).to(torch.int32)
