"""The Triton backend's prefill (torch SDPA, so it runs on the CPU too): one causal call per
prompt or one masked call for a short batch of prompts, against causal attention per prompt in
float64 written out by hand."""
import pytest
import torch

import runner.attention.triton as triton_backend
from runner.forward_context import AttentionMetadata


def _meta(lengths: list[int]) -> AttentionMetadata:
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    unused = torch.zeros(len(lengths), dtype=torch.int32)
    return AttentionMetadata(is_prefill=True, slot_mapping=torch.zeros(starts[-1]),
                             query_start_loc=torch.tensor(starts, dtype=torch.int32),
                             query_start_loc_cpu=starts, seq_lens=unused, local_seq_lens=unused,
                             block_table=unused[:, None], max_local_seq_len=0)


def _reference(q, k, v, lengths, scale):
    """q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, H, Dv]: each prompt attends causally
    to itself only; query head h reads kv head h // (H / Hkv)."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for length in lengths:
        qs, ks, vs = (t[start:start + length].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [H, L, L]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs))
        start += length
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[7], [5, 1, 9], [3, 12]])
@pytest.mark.parametrize("max_masked", [4096, 8], ids=["masked", "per-prompt"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,v_dim", [(4, 4, 24, 16), (6, 2, 16, 16)],
                         ids=["mla-like", "gqa"])
def test_prefill_matches_causal_attention_per_prompt(lengths, max_masked, num_heads,
                                                     num_kv_heads, head_dim, v_dim, monkeypatch):
    monkeypatch.setattr(triton_backend, "MAX_MASKED_PREFILL_TOKENS", max_masked)
    g = torch.Generator().manual_seed(sum(lengths))
    num_tokens = sum(lengths)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    v = torch.randn(num_tokens, num_kv_heads, v_dim, generator=g)
    out, lse = triton_backend.TritonAttention().prefill(q, k, v, _meta(lengths), scale=0.3)
    assert lse is None and out.shape == (num_tokens, num_heads, v_dim)
    torch.testing.assert_close(out.double(), _reference(q, k, v, lengths, 0.3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths, masked", [
    ([2] * 128, True),  # the seed workload's prompts: one call, not 128
    ([256] * 8, True),
    ([7], False),  # one prompt: causal, no mask
    ([2000, 2000], False),  # two long prompts: two causal calls beat a 4000 x 4000 mask
    ([2] * 2049, False),  # past the largest mask
])
def test_one_masked_call_only_where_cheaper(lengths, masked):
    assert triton_backend.one_masked_call(lengths) is masked
