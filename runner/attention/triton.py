"""GPU attention: Triton paged decode (split-KV, natural-log LSE) and KV writes; prefill of
fresh tokens with torch SDPA: one masked call for many short prompts, else one causal call per
prompt (no mask: SDPA's fastest kernels, 2.2-3x the masked call on one H200), by a cost model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kv_write import write_kv
from kernels.paged_decode import MAX_SHORT_CONTEXT, paged_decode
from runner.forward_context import AttentionMetadata, KVCacheSpec

MAX_MASKED_PREFILL_TOKENS = 4096  # the largest dense [T, T] mask built
# SDPA cost on one H200 (benchmarks/prefill_attention_bench.py, bf16, MLA and GQA shapes): a causal
# call per prompt ~15 us + 1.1e-5 us x tokens^2; one masked call over all prompts ~2.9e-5 us x T^2.
CAUSAL_CALL_US, CAUSAL_US_PER_TOKEN2, MASKED_US_PER_TOKEN2 = 15.0, 1.1e-5, 2.9e-5


def one_masked_call(prompt_lengths: list[int]) -> bool:
    """Whether one masked SDPA call over all prompts is cheaper than a causal call per prompt."""
    num_tokens = sum(prompt_lengths)
    if len(prompt_lengths) == 1 or num_tokens > MAX_MASKED_PREFILL_TOKENS:
        return False
    per_prompt_us = sum(CAUSAL_CALL_US + CAUSAL_US_PER_TOKEN2 * n * n for n in prompt_lengths)
    return MASKED_US_PER_TOKEN2 * num_tokens * num_tokens < per_prompt_us


class TritonAttention:
    returns_lse = True  # decode; prefill returns lse None (nothing combines prefill outputs)
    decode_length_buckets = (MAX_SHORT_CONTEXT,)  # short contexts: one split, no merge
    decode_in_graphs = True

    @property
    def fused_kv_write(self) -> bool:
        """write_kv stores plain rows, so the MLA and GQA prologue kernels may store them
        instead; not for a subclass that overrides write_kv (it gets every call)."""
        return type(self).write_kv is TritonAttention.write_kv

    def kv_cache_shape(self, spec: KVCacheSpec, num_blocks: int, block_size: int) -> tuple:
        per_tensor = (num_blocks, block_size, spec.num_kv_heads, spec.head_size)
        return per_tensor if spec.shared else (2, *per_tensor)

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        write_kv(k_cache, slot_mapping, key)
        if value is not None:
            write_kv(v_cache, slot_mapping, value)

    def prefill(self, q, k, v, meta: AttentionMetadata, scale: float):
        starts = meta.query_start_loc_cpu
        lengths = [end - start for start, end in zip(starts[:-1], starts[1:])]
        gqa = q.shape[1] != k.shape[1]
        if one_masked_call(lengths):
            req = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                          torch.tensor(lengths, device=q.device))
            mask = (req[:, None] == req[None, :]).tril()  # [T, T] causal, within a request
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                 v.transpose(0, 1), attn_mask=mask, scale=scale,
                                                 enable_gqa=gqa)
            return out.transpose(0, 1), None
        out = q.new_empty(*q.shape[:2], v.shape[-1])  # [T, H, Dv]
        for start, end in zip(starts[:-1], starts[1:]):
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
                v[start:end].transpose(0, 1), is_causal=True, scale=scale,
                enable_gqa=gqa).transpose(0, 1)
        return out, None

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        return paged_decode(q, k_cache, v_cache, meta.block_table, meta.local_seq_lens, scale,
                            max_seq_len=meta.max_local_seq_len)
