"""KV cache: the block allocator (virtual block ids, shared by the DCP ranks) and the per-layer
cache tensors of this rank."""
from __future__ import annotations

from collections import deque

import torch

from runner.forward_context import KVCacheSpec


class BlockAllocator:
    """Free-list of block ids. Deterministic: the same calls give the same ids on every rank."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, num: int) -> list[int] | None:
        """`num` block ids, or None (nothing taken) if fewer are free."""
        if num > len(self._free):
            return None
        return [self._free.popleft() for _ in range(num)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


def bytes_per_block(spec: KVCacheSpec, num_layers: int, block_size: int,
                    dtype: torch.dtype) -> int:
    """Bytes one physical block takes on one rank, over all layers."""
    per_token = spec.num_kv_heads * spec.head_size * (1 if spec.shared else 2)
    return per_token * block_size * num_layers * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(backend, spec: KVCacheSpec, num_layers: int, num_blocks: int,
                       block_size: int, dtype: torch.dtype, device: torch.device
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One cache tensor per layer, returned as (k_cache, v_cache) views
    [num_blocks, block_size, num_kv_heads, head_size]; V is a prefix view of K when shared."""
    caches = []
    for _ in range(num_layers):
        cache = torch.zeros(backend.kv_cache_shape(spec, num_blocks, block_size), dtype=dtype,
                            device=device)
        if spec.shared:
            caches.append((cache, cache[..., :spec.v_head_size]))
        else:
            caches.append((cache[0], cache[1]))
    return caches
