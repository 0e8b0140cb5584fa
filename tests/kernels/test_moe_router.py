"""The fused MoE router (interpreter) against its torch reference: greedy and group-limited
selection, renormalised or scaled weights, expert counts that are not powers of two."""
import pytest
import torch

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
