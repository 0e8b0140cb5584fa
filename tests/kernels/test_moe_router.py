"""The fused MoE router (interpreter) against its torch reference: greedy and group-limited
selection, renormalised or scaled weights, expert counts that are not powers of two."""
import pytest
import torch

from kernels.expert_buckets import ExpertBuckets
from kernels.moe_router import moe_route, moe_route_ref


def _sorted(weights, ids):
    """Choices in expert order (the kernel picks best-first, torch's topk in any order)."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("num_experts,top_k,num_groups,topk_group", [
    (64, 6, 1, 1), (20, 3, 1, 1), (16, 4, 4, 2), (12, 2, 3, 1), (8, 1, 1, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_matches_reference(num_experts, top_k, num_groups, topk_group, renormalize):
    g = torch.Generator().manual_seed(num_experts * 10 + top_k)
    x = torch.randn(37, 96, generator=g).to(torch.bfloat16)  # 37 tokens: a partial last program
    weight = (torch.randn(num_experts, 96, generator=g) * 0.2).to(torch.bfloat16)
    args = (top_k, num_groups, topk_group, renormalize, 2.5)
    got_w, got_ids = _sorted(*moe_route(x, weight, *args))
    ref_w, ref_ids = _sorted(*moe_route_ref(x, weight, *args))
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    if num_groups > 1:  # every chosen expert lies in one of the topk_group chosen groups
        groups = got_ids // (num_experts // num_groups)
        assert all(len(set(row.tolist())) <= topk_group for row in groups)


@pytest.mark.parametrize("num_experts,hidden_size,dtype", [
    (64, 300, torch.bfloat16),  # three K splits of 128 columns, the last one 44 wide
    (160, 200, torch.float32),  # 256-wide expert tiles: splits of 32 columns
    (12, 80, torch.float16)])
def test_split_k_logits(num_experts, hidden_size, dtype):
    """The logits summed over K splits, in order, in fp32; 40 tokens: three token blocks."""
    g = torch.Generator().manual_seed(hidden_size)
    x = torch.randn(40, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(num_experts, hidden_size, generator=g) * 0.1).to(dtype)
    args = (4, 1, 1, True, 1.0)
    got_w, got_ids = _sorted(*moe_route(x, weight, *args))
    ref_w, ref_ids = _sorted(*moe_route_ref(x, weight, *args))
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_a_tokens_routing_does_not_depend_on_its_batch():
    """The K splits come from the shapes alone: 7 tokens routed alone or among 40 get the same
    bits (a single launch config per batch would otherwise change the fp32 sums' order)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 300, generator=g).to(torch.bfloat16)
    weight = (torch.randn(64, 300, generator=g) * 0.1).to(torch.bfloat16)
    batch_w, batch_ids = moe_route(x, weight, 6, 1, 1, False, 1.0)
    alone_w, alone_ids = moe_route(x[17:24].clone(), weight, 6, 1, 1, False, 1.0)
    assert torch.equal(alone_ids, batch_ids[17:24]) and torch.equal(alone_w, batch_w[17:24])


def test_mixed_dtypes_use_fp32():
    """A bf16 input with an fp32 router weight: the weight is not rounded to bf16."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 64, generator=g).to(torch.bfloat16)
    weight = torch.randn(8, 64, generator=g) * 0.3
    got_w, got_ids = _sorted(*moe_route(x, weight, 2, 1, 1, False, 1.0))
    ref_w, ref_ids = _sorted(*moe_route_ref(x, weight, 2, 1, 1, False, 1.0))
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_strided_rows_and_empty_batch():
    x = torch.randn(5, 128)[:, :64]
    weight = torch.randn(16, 64)
    got = _sorted(*moe_route(x, weight, 2, 1, 1, False, 1.0))
    ref = _sorted(*moe_route_ref(x, weight, 2, 1, 1, False, 1.0))
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0])
    weights, ids = moe_route(torch.empty(0, 64), weight, 2, 1, 1, False, 1.0)
    assert weights.shape == ids.shape == (0, 2)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="moe_route"):
        moe_route(torch.randn(4, 8), torch.randn(6, 16), 2, 1, 1, False, 1.0)
    with pytest.raises(ValueError, match="top_k=7"):
        moe_route(torch.randn(4, 8), torch.randn(6, 8), 7, 1, 1, False, 1.0)


@pytest.mark.parametrize("num_tokens", [0, 37])
def test_fills_the_fused_moes_buckets(num_tokens):
    """With buckets, the same choices, and each expert's bucket holds exactly the pairs that
    chose it, although the counts held stale values before (the logits kernel zeroes them)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(num_tokens, 96, generator=g).to(torch.bfloat16)
    weight = (torch.randn(20, 96, generator=g) * 0.2).to(torch.bfloat16)
    buckets = ExpertBuckets.empty(20, num_tokens * 3, x.device)
    buckets.counts.fill_(5)
    weights, ids = moe_route(x, weight, 3, 1, 1, True, 1.0, buckets=buckets)
    plain_weights, plain_ids = moe_route(x, weight, 3, 1, 1, True, 1.0)
    assert torch.equal(ids, plain_ids) and torch.equal(weights, plain_weights)
    flat_ids = ids.flatten().tolist()
    for e in range(20):
        pairs = [p for p, pair_expert in enumerate(flat_ids) if pair_expert == e]
        assert int(buckets.counts[e]) == len(pairs)
        assert sorted(buckets.pairs[e, :len(pairs)].tolist()) == pairs
    with pytest.raises(ValueError, match="buckets must hold"):  # sized for 20 experts
        moe_route(x, weight[:19], 3, 1, 1, True, 1.0, buckets=buckets)
