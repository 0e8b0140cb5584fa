"""Reference attention in plain torch (CPU and GPU): paged KV writes, causal prefill over fresh
tokens, paged decode returning the natural-log LSE. Clear rather than fast; the oracle for the
Triton backend."""
from __future__ import annotations

import torch

from runner.forward_context import AttentionMetadata, KVCacheSpec


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., H, Q, D], k [..., H, K, D], v [..., H, K, Dv], mask [..., Q, K] (True = attend)
    -> out [..., H, Q, Dv] in q's dtype, lse [..., H, Q] fp32.
    Fully masked rows: out 0, lse -inf."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is attended
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp(min=torch.finfo(torch.float32).min))
    out = torch.matmul(probs, v.float())
    return out.to(q.dtype), lse


def _expand_kv(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[..., Hkv, K, D] -> [..., H, K, D]: each KV head serves H/Hkv consecutive query heads."""
    return x.repeat_interleave(num_heads // x.shape[head_dim], dim=head_dim)


class TorchAttention:
    returns_lse = True
    decode_length_buckets = ()  # decode's shapes follow the length bound; no launch to tune
    # decode gathers every row's context up to the bound: captured at max_model_len, one of its
    # allocations was 18 GiB for 16 requests of DeepSeek-V2-Lite at 32k tokens (an H200 run);
    # graph=auto runs it eagerly
    decode_in_graphs = False
    fused_kv_write = False  # every cache write goes through write_kv

    def kv_cache_shape(self, spec: KVCacheSpec, num_blocks: int, block_size: int) -> tuple:
        per_tensor = (num_blocks, block_size, spec.num_kv_heads, spec.head_size)
        return per_tensor if spec.shared else (2, *per_tensor)

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        mine = slot_mapping >= 0
        slots = slot_mapping[mine]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = key[mine].to(k_cache.dtype)
        if value is not None:
            v_cache.view(-1, *v_cache.shape[2:])[slots] = value[mine].to(v_cache.dtype)

    def prefill(self, q, k, v, meta: AttentionMetadata, scale: float):
        out = q.new_empty(*q.shape[:2], v.shape[-1])  # [T, H, Dv]
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [T, H]
        starts = meta.query_start_loc_cpu
        for start, end in zip(starts[:-1], starts[1:]):
            n = end - start
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            o, s = _attend(q[start:end].transpose(0, 1),
                           _expand_kv(k[start:end].transpose(0, 1), q.shape[1], 0),
                           _expand_kv(v[start:end].transpose(0, 1), q.shape[1], 0), causal, scale)
            out[start:end] = o.transpose(0, 1)
            lse[start:end] = s.transpose(0, 1)
        return out, lse

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        block_size = k_cache.shape[1]
        max_len = max(meta.max_local_seq_len, 1)
        pos = torch.arange(max_len, device=q.device)  # [L]
        blocks = meta.block_table[:, pos // block_size].long()  # [R, L]
        slots = blocks * block_size + pos % block_size  # [R, L]
        k = k_cache.view(-1, *k_cache.shape[2:])[slots]  # [R, L, Hkv, D]
        v = v_cache.view(-1, *v_cache.shape[2:])[slots]  # [R, L, Hkv, Dv]
        mask = (pos < meta.local_seq_lens[:, None]).unsqueeze(1)  # [R, 1, L]
        out, lse = _attend(q.unsqueeze(2),  # [R, H, 1, D]
                           _expand_kv(k.transpose(1, 2), q.shape[1], 1),
                           _expand_kv(v.transpose(1, 2), q.shape[1], 1), mask, scale)
        return out.squeeze(2), lse.squeeze(2)
