"""Triton fused MoE vs the torch fused_moe and float64 brute force (one token and choice at a
time): ids of experts held elsewhere (-1), experts with no tokens, one expert chosen by every
token (several row blocks), ragged tiles, a per-token input added to the sum (the shared experts'
output); on a GPU, DeepSeek-V2-Lite shapes and CUDA graphs."""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from kernels.expert_buckets import ExpertBuckets, bucket_by_expert, max_row_blocks
from kernels.fused_moe import GemmTiles, MoeConfig, fused_moe_triton, moe_config
from kernels.moe_router import moe_route
from kernels.rms_norm import rms_norm, rms_norm_ref
from runner.models.layers.moe import fused_moe


def _moe_f64(x, w13, w2, topk_ids, topk_weights):
    """sum_k w[t, k] * down_e(silu(gate_e x_t) * up_e x_t) in float64, skipping ids outside E."""
    num_experts, intermediate_size = w13.shape[0], w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if not 0 <= e < num_experts:
                continue
            gate_up = w13[e].double() @ x[t].double()  # [2I]
            act = F.silu(gate_up[:intermediate_size]) * gate_up[intermediate_size:]
            out[t] += float(topk_weights[t, k]) * (w2[e].double() @ act)
    return out


def _case(num_tokens, top_k, num_experts, hidden_size, intermediate_size, dtype, seed):
    """Random x, weights and routing (distinct experts per token) at unit output scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * intermediate_size, hidden_size, generator=gen)
           * hidden_size ** -0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden_size, intermediate_size, generator=gen)
          * intermediate_size ** -0.5).to(dtype)
    topk_ids = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    return x, w13, w2, topk_ids, topk_weights


def _check(x, w13, w2, topk_ids, topk_weights, config=None, add=None):
    out = fused_moe_triton(x, w13, w2, topk_ids, topk_weights, config=config, add=add)
    assert out.dtype == x.dtype and out.shape == x.shape
    want = _moe_f64(x, w13, w2, topk_ids, topk_weights)
    if add is not None:
        want += add.double()
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2  # bf16: one output rounding and the act's
    scale = max(float(want.abs().max()), 1.0)
    torch.testing.assert_close(out.double(), want, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(out, fused_moe(x, w13, w2, topk_ids, topk_weights, add=add),
                               atol=tol * scale, rtol=tol)
    return out


@pytest.mark.parametrize("flat_ids, num_experts", [
    ([3, -1, 0, 3, 3, 5, 0, 9, 3], 6),  # experts 1, 2, 4 empty; 9 is outside E=6
    ([2] * 40 + [0], 4),  # one expert over three 16-row blocks
    (torch.randint(-1, 5, (300,), generator=torch.Generator().manual_seed(0)).tolist(), 5),
    # three 1024-pair programs; ids 64..69 are outside E=64
    (torch.randint(-1, 70, (2100,), generator=torch.Generator().manual_seed(1)).tolist(), 64),
])
def test_bucket_by_expert_groups_pairs_by_expert(flat_ids, num_experts):
    """Each expert's bucket holds exactly its pairs (in any order); other ids are dropped."""
    buckets = bucket_by_expert(torch.tensor(flat_ids), num_experts)
    assert buckets.pairs.shape == (num_experts, len(flat_ids))
    for e in range(num_experts):
        pairs = [p for p, pair_expert in enumerate(flat_ids) if pair_expert == e]
        assert int(buckets.counts[e]) == len(pairs)
        assert sorted(buckets.pairs[e, :len(pairs)].tolist()) == pairs


def test_max_row_blocks_bounds_every_routing():
    """The worst case: every non-empty bucket one row past a whole block."""
    assert max_row_blocks(768, 64, 16) == 108  # 64 buckets of 12 pairs would need only 64
    assert max_row_blocks(17 * 64, 64, 16) == 2 * 64
    assert max_row_blocks(3, 64, 16) == 3  # at most 3 non-empty buckets


@pytest.mark.parametrize("num_tokens, num_experts, hidden_size, intermediate_size", [
    (1, 4, 32, 32), (3, 8, 64, 48), (9, 8, 48, 40), (6, 5, 64, 32)])
def test_random_routing_float32(num_tokens, num_experts, hidden_size, intermediate_size):
    case = _case(num_tokens, 2, num_experts, hidden_size, intermediate_size, torch.float32,
                 seed=num_tokens)
    _check(*case)


def test_bfloat16():
    _check(*_case(7, 2, 8, 64, 48, torch.bfloat16, seed=1))


def test_ids_held_elsewhere_and_experts_without_tokens():
    x, w13, w2, topk_ids, topk_weights = _case(9, 2, 8, 64, 32, torch.float32, seed=2)
    topk_ids = torch.tensor([[0, 1], [-1, 1], [7, -1], [-1, -1], [1, 0], [6, 7], [0, -1],
                             [0, 1], [7, 1]])  # experts 2..5 unused
    out = _check(x, w13, w2, topk_ids, topk_weights)
    assert (out[3] == 0).all()
    topk_ids[7, 0] = 8  # outside E=8: skipped like -1 (the torch fused_moe leaves it undefined)
    torch.testing.assert_close(fused_moe_triton(x, w13, w2, topk_ids, topk_weights).double(),
                               _moe_f64(x, w13, w2, topk_ids, topk_weights), atol=1e-5, rtol=1e-5)
    all_elsewhere = torch.full_like(topk_ids, -1)
    assert (fused_moe_triton(x, w13, w2, all_elsewhere, topk_weights) == 0).all()


def test_one_expert_for_every_token_fills_several_row_blocks():
    """18 pairs on expert 2 (both choices of each token) span two 16-row blocks."""
    x, w13, w2, _, topk_weights = _case(9, 2, 4, 32, 32, torch.float32, seed=3)
    _check(x, w13, w2, torch.full((9, 2), 2, dtype=torch.int32), topk_weights)


def test_more_pairs_than_one_bucketing_program():
    """1,050 pairs: two 1024-pair programs fill the buckets; 4 experts of ~260 pairs each."""
    _check(*_case(350, 3, 4, 32, 32, torch.float32, seed=8))


def test_ragged_tiles_and_strided_inputs():
    """Several N tiles and K steps, none of them full (I=40, H=48 against 32-wide tiles)."""
    x, w13, w2, topk_ids, topk_weights = _case(5, 2, 6, 48, 40, torch.float32, seed=4)
    config = MoeConfig(16, GemmTiles(32, 16, 1, 1), GemmTiles(32, 32, 1, 1))
    wide = torch.randn(5, 2 * 48)
    _check(wide[:, ::2], w13, w2, topk_ids.t().contiguous().t(), topk_weights, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_added_input(dtype):
    """A per-token input (the shared experts' output) joins the fp32 sum, also for tokens whose
    experts are all held elsewhere, and alone when no pair is local."""
    x, w13, w2, topk_ids, topk_weights = _case(6, 2, 5, 32, 32, dtype, seed=11)
    topk_ids[2] = -1
    add = torch.randn(6, 32, generator=torch.Generator().manual_seed(11)).to(dtype)
    out = _check(x, w13, w2, topk_ids, topk_weights, add=add)
    torch.testing.assert_close(out[2], add[2])
    alone = fused_moe_triton(x, w13, w2, torch.full_like(topk_ids, -1), topk_weights, add=add)
    torch.testing.assert_close(alone, add)


def test_buckets_from_the_router():
    """The router's buckets give the bits of the MoE's own bucketing, also when the sum reads no
    ids (all_local: the router's ids are all in range); a wrong size is named."""
    x, w13, w2, _, _ = _case(21, 3, 6, 32, 32, torch.float32, seed=12)
    gate = torch.randn(6, 32, generator=torch.Generator().manual_seed(12))
    buckets = ExpertBuckets.empty(6, 21 * 3, x.device)
    topk_weights, topk_ids = moe_route(x, gate, 3, 1, 1, True, 1.0, buckets=buckets)
    out = fused_moe_triton(x, w13, w2, topk_ids, topk_weights, buckets=buckets)
    assert torch.equal(out, fused_moe_triton(x, w13, w2, topk_ids, topk_weights))
    assert torch.equal(out, fused_moe_triton(x, w13, w2, topk_ids, topk_weights,
                                             buckets=buckets, all_local=True))
    with pytest.raises(ValueError, match=r"buckets must hold .*P=42"):
        fused_moe_triton(x, w13, w2, topk_ids[:, :2], topk_weights[:, :2], buckets=buckets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_add_and_norm_in_the_sum_kernel(dtype):
    """With residual and norm: the bits of the MoE's output, then kernels/rms_norm.py's add and
    norm (48 columns: a masked row), also for a token with no local expert and for top_k 0."""
    x, w13, w2, topk_ids, topk_weights = _case(6, 2, 5, 48, 32, dtype, seed=13)
    topk_ids[2] = -1
    gen = torch.Generator().manual_seed(13)
    add, residual = (torch.randn(6, 48, generator=gen).to(dtype) for _ in range(2))
    weight = (torch.rand(48, generator=gen) + 0.5).to(dtype)
    for ids, weights in ((topk_ids, topk_weights), (topk_ids[:, :0], topk_weights[:, :0])):
        normed, summed = fused_moe_triton(x, w13, w2, ids, weights, add=add,
                                          residual=residual, norm=(weight, 1e-6))
        want_normed, want_summed = rms_norm(fused_moe_triton(x, w13, w2, ids, weights, add=add),
                                            weight, 1e-6, residual)
        assert torch.equal(summed, want_summed) and torch.equal(normed, want_normed)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # the reference rounds weight * normed
    torch.testing.assert_close(normed, rms_norm_ref(add, weight, 1e-6, residual)[0], atol=tol,
                               rtol=tol)
    with pytest.raises(ValueError, match="residual and norm"):
        fused_moe_triton(x, w13, w2, topk_ids, topk_weights, residual=residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_rank_decode_path(dtype):
    """Router buckets, ids not read (all_local), the shared experts' output added, then the
    residual and norm: the bits of the unfused MoE followed by kernels/rms_norm.py."""
    x, w13, w2, _, _ = _case(19, 3, 6, 48, 32, dtype, seed=14)
    gen = torch.Generator().manual_seed(14)
    gate = torch.randn(6, 48, generator=gen).to(dtype)
    add, residual = (torch.randn(19, 48, generator=gen).to(dtype) for _ in range(2))
    weight = (torch.rand(48, generator=gen) + 0.5).to(dtype)
    buckets = ExpertBuckets.empty(6, 19 * 3, x.device)
    topk_weights, topk_ids = moe_route(x, gate, 3, 1, 1, True, 1.0, buckets=buckets)
    normed, summed = fused_moe_triton(x, w13, w2, topk_ids, topk_weights, add=add,
                                      buckets=buckets, residual=residual, norm=(weight, 1e-6),
                                      all_local=True)
    want_normed, want_summed = rms_norm(
        fused_moe_triton(x, w13, w2, topk_ids, topk_weights, add=add), weight, 1e-6, residual)
    assert torch.equal(summed, want_summed) and torch.equal(normed, want_normed)


def test_float32_results_are_reproducible():
    case = _case(4, 2, 4, 32, 32, torch.float32, seed=5)
    assert torch.equal(fused_moe_triton(*case), fused_moe_triton(*case))


def test_empty_batch():
    x, w13, w2, topk_ids, topk_weights = _case(1, 2, 4, 32, 32, torch.float32, seed=6)
    out = fused_moe_triton(x[:0], w13, w2, topk_ids[:0], topk_weights[:0])
    assert out.shape == (0, 32)


def test_gpu_configs_fit_the_tensor_cores(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for num_tokens in (1, 2, 8, 9, 32, 100, 128, 256, 257, 4096):
        for dtype in (torch.bfloat16, torch.float32):
            config = moe_config(num_tokens, 64, 2048, 704, dtype)
            assert config.block_m >= 16
            for tiles in (config.gate_up, config.down):
                assert tiles.block_n >= 16 and tiles.block_k >= 16
                assert tiles.block_n & (tiles.block_n - 1) == 0
                assert tiles.block_k & (tiles.block_k - 1) == 0


def test_gate_up_tiles_divide_the_intermediate_size(monkeypatch):
    """No half-empty last column tile: 704 (TP2 width) gets BLOCK_N 64 where 1408 gets 128."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for num_tokens in (1, 8, 64, 128, 256, 4096):
        wide = moe_config(num_tokens, 64, 2048, 1408, torch.bfloat16)
        narrow = moe_config(num_tokens, 64, 2048, 704, torch.bfloat16)
        assert 1408 % wide.gate_up.block_n == 0 and 704 % narrow.gate_up.block_n == 0
        assert narrow.gate_up.block_n == min(wide.gate_up.block_n, 64)
        assert narrow.down == wide.down


@pytest.mark.parametrize("change, match", [
    (lambda c: (c[0][:, :8], *c[1:]), "w13 must be"),
    (lambda c: (c[0], c[1], c[2][:, :, :8], *c[3:]), "w2 must be"),
    (lambda c: (*c[:3], c[3].float(), c[4]), "topk_ids must be"),
    (lambda c: (*c[:4], c[4][:, :1]), "topk_weights must be"),
    (lambda c: (c[0].double(), *c[1:]), "x must be"),
    (lambda c: (*c, None, torch.zeros(2, 16)), "add must be"),
])
def test_bad_inputs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        fused_moe_triton(*change(_case(2, 2, 4, 32, 32, torch.float32, seed=7)))


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and TRITON_INTERPRET=0 (to compile the kernels)")


@functools.cache
def _gpu_weights(intermediate_size):
    """DeepSeek-V2-Lite routed experts (E=64, H=2048) in fp32 on the GPU: w13, w2."""
    gen = torch.Generator(device="cuda").manual_seed(intermediate_size)
    w13 = torch.randn(64, 2 * intermediate_size, 2048, device="cuda", generator=gen) / 2048 ** 0.5
    w2 = (torch.randn(64, 2048, intermediate_size, device="cuda", generator=gen)
          / intermediate_size ** 0.5)
    return w13, w2


def _gpu_case(num_tokens, intermediate_size=1408, dtype=torch.bfloat16):
    """x and weights in dtype, top-6 routing of 64 experts, fp32 router weights."""
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    w13, w2 = _gpu_weights(intermediate_size)
    x = torch.randn(num_tokens, 2048, device="cuda", generator=gen)
    topk_ids = torch.rand(num_tokens, 64, device="cuda", generator=gen).topk(6, dim=-1).indices
    topk_weights = torch.rand(num_tokens, 6, device="cuda", generator=gen)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), topk_ids, topk_weights


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_tokens", [1, 2, 8, 32, 64, 128, 256])
@pytest.mark.parametrize("intermediate_size", [1408, 704])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_deepseek_v2_lite_shapes(num_tokens, intermediate_size, dtype):
    """Against the torch fused_moe in fp32 (IEEE matmuls): bf16 may differ by its roundings of
    the activation and output, fp32 only by summation order."""
    x, w13, w2, topk_ids, topk_weights = _gpu_case(num_tokens, intermediate_size, dtype)
    topk_ids[::5, 1] = -1  # some pairs held elsewhere
    add = x.flip(0)  # a per-token input to the sum, as the shared experts' output
    out = fused_moe_triton(x, w13, w2, topk_ids, topk_weights, add=add)
    want = fused_moe(x.float(), w13.float(), w2.float(), topk_ids, topk_weights, add=add.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol * float(want.abs().max()), rtol=tol)
    if dtype == torch.bfloat16:  # no worse than the torch bf16 path, give or take one rounding
        torch_err = (fused_moe(x, w13, w2, topk_ids, topk_weights, add=add).float()
                     - want).abs().max()
        assert (out.float() - want).abs().max() <= 2 * torch_err + 1e-2 * want.abs().max()


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_replays_new_routing():
    """Captured once, replayed after the routing changed in place (-1 ids, one hot expert)."""
    x, w13, w2, topk_ids, topk_weights = _gpu_case(32)
    fused_moe_triton(x, w13, w2, topk_ids, topk_weights)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_triton(x, w13, w2, topk_ids, topk_weights)
    for new_ids in (torch.randint(-1, 64, topk_ids.shape), torch.full(topk_ids.shape, 3)):
        topk_ids.copy_(new_ids)
        graph.replay()
        want = fused_moe_triton(x, w13, w2, topk_ids, topk_weights)
        torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_replays_the_routers_buckets():
    """Router and MoE captured together (DeepSeek-V2-Lite, 128 tokens), replayed on new inputs:
    the buckets are rebuilt in every replay and the output equals an eager run's bits."""
    x, w13, w2, _, _ = _gpu_case(128)
    gate = torch.randn(64, 2048, device="cuda").to(torch.bfloat16) * 0.02

    def run():
        buckets = ExpertBuckets.empty(64, 128 * 6, x.device)
        weights, ids = moe_route(x, gate, 6, 1, 1, False, 1.0, buckets=buckets)
        return fused_moe_triton(x, w13, w2, ids, weights, buckets=buckets)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(seed)))
        graph.replay()
        weights, ids = moe_route(x, gate, 6, 1, 1, False, 1.0)
        torch.testing.assert_close(out, fused_moe_triton(x, w13, w2, ids, weights), atol=0,
                                   rtol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("captured", [False, True])
def test_gpu_add_from_a_side_stream_is_awaited(captured):
    """`add` written late on another stream (after a ~10 ms spin): the sum waits for
    add_ready, eagerly and inside a CUDA graph, so it never reads the stale values."""
    x, w13, w2, topk_ids, topk_weights = _gpu_case(32)
    want = fused_moe_triton(x, w13, w2, topk_ids, topk_weights, add=x.flip(0))
    add = torch.zeros_like(x)  # stale until the side stream writes it
    side = torch.cuda.Stream()

    def run():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # cycles: ~10 ms at ~2 GHz
            add.copy_(x.flip(0))
            ready = torch.cuda.Event()
            ready.record(side)
        return fused_moe_triton(x, w13, w2, topk_ids, topk_weights, add=add, add_ready=ready)

    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        add.zero_()
        graph.replay()
    else:
        out = run()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
