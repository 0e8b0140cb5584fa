"""What one forward pass needs besides token ids and positions: attention metadata, the KV
cache views per layer and the attention backend. Built by the runner, read by attention layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runner.interfaces import AttentionBackend


@dataclass
class AttentionMetadata:
    """Per-step attention inputs. A step is all-prefill (fresh prompts) or all-decode."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1: not stored on this rank (or padding)
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, cumulative new tokens per request
    query_start_loc_cpu: list[int]  # the same, on the host
    seq_lens: torch.Tensor  # [num_reqs] int32, tokens of each request including the new ones
    local_seq_lens: torch.Tensor  # [num_reqs] int32, of those, the ones stored on this rank
    block_table: torch.Tensor  # [num_reqs, max_num_blocks] int32, shared by all DCP ranks
    max_local_seq_len: int  # host upper bound of local_seq_lens (a decode graph's: its bound)

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass
class KVCacheSpec:
    """What one attention layer stores per token. MLA: one latent "head" of kv_lora_rank + rope
    dims whose first `v_head_size` dims are also the value (`shared=True`)."""

    num_kv_heads: int
    head_size: int
    v_head_size: int
    shared: bool  # V is a prefix view of K (MLA latent); else separate K and V tensors


@dataclass
class ForwardContext:
    attn_meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
    attention: AttentionBackend

    @property
    def fused_kv_write(self) -> bool:
        """A layer's prologue kernel may store its cache rows instead of calling write_kv (the
        backend says so; one without the attribute: False)."""
        return getattr(self.attention, "fused_kv_write", False)
