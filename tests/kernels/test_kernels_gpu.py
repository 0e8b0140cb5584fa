"""The Triton kernels compiled for the GPU at DeepSeek-V2-Lite decode shapes (16 heads over a
576-wide latent, 512 of it the value) vs their torch references. Run with
`TRITON_INTERPRET=0 pytest -m gpu tests/kernels`."""
import os

import pytest
import torch

from kernels.kv_write import write_kv, write_kv_ref
from kernels.merge_states import merge_states, merge_states_ref, scale_own, scale_own_ref
from kernels.paged_decode import paged_decode, paged_decode_ref
from kernels.slot_mapping import (local_seq_lens, local_seq_lens_ref, slot_mapping,
                                  slot_mapping_ref)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="set TRITON_INTERPRET=0 to compile the kernels for the GPU"),
]
BLOCK_SIZE = 64
NUM_HEADS, LATENT_DIM, ROPE_DIM = 16, 512, 64


def _paged_batch(batch, max_context, num_kv_heads, head_dim, dtype, seed):
    """A random paged cache, a shuffled block table and random lengths (some 0, one full)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    max_blocks = max_context // BLOCK_SIZE
    num_blocks = batch * max_blocks + 3
    cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, device="cuda",
                        generator=gen).to(dtype)
    table = torch.randperm(num_blocks, device="cuda", generator=gen)[:batch * max_blocks]
    seq_lens = torch.randint(0, max_context + 1, (batch,), device="cuda", generator=gen)
    seq_lens[0] = max_context
    seq_lens[1:][::7] = 0
    return cache, table.view(batch, max_blocks).int(), seq_lens.int()


@pytest.mark.parametrize("cp_size, interleave", [(1, 1), (4, 1), (4, 64), (3, 16)])
def test_slot_mapping(cp_size, interleave):
    gen = torch.Generator(device="cuda").manual_seed(cp_size)
    batch, max_blocks = 256, 8192 // (BLOCK_SIZE * cp_size) + 1
    table = torch.randint(0, 10**6, (batch, max_blocks), device="cuda", generator=gen).int()
    positions = torch.randint(0, 8192, (5000,), device="cuda", generator=gen)
    reqs = torch.randint(-1, batch, (5000,), device="cuda", generator=gen)
    seq_lens = torch.randint(0, 8192, (batch,), device="cuda", generator=gen).int()
    for rank in range(cp_size):
        args = (BLOCK_SIZE, cp_size, rank, interleave)
        assert torch.equal(slot_mapping(positions, reqs, table, *args),
                           slot_mapping_ref(positions, reqs, table, *args))
        assert torch.equal(local_seq_lens(seq_lens, cp_size, rank, interleave),
                           local_seq_lens_ref(seq_lens, cp_size, rank, interleave))


@pytest.mark.parametrize("num_states", [2, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [LATENT_DIM, LATENT_DIM + ROPE_DIM])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_states(num_states, head_dim, dtype):
    outs = torch.randn(num_states, 256, NUM_HEADS, head_dim, device="cuda").to(dtype)
    lses = torch.randn(num_states, 256, NUM_HEADS, device="cuda") * 4
    lses[:, 3] = float("-inf")  # token 3: every part empty, with NaN outputs
    outs[:, 3] = float("nan")
    lses[0, 5], outs[0, 5] = float("inf"), float("nan")  # part 0 of token 5 empty
    lses[1, 6], outs[1, 6] = float("nan"), float("nan")  # part 1 of token 6 empty
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    out, lse = merge_states(outs, lses)
    ref_out, ref_lse = merge_states_ref(outs, lses)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse)
    for rank in range(num_states):
        scaled, own_lse = scale_own(outs[rank], lses, rank)
        ref_scaled, _ = scale_own_ref(outs[rank], lses, rank)
        torch.testing.assert_close(scaled, ref_scaled, **tol)
        torch.testing.assert_close(own_lse, ref_lse)


@pytest.mark.parametrize("latent_only", [False, True])
def test_write_kv(latent_only):
    cache = torch.zeros(300, BLOCK_SIZE, 1, LATENT_DIM + ROPE_DIM, device="cuda",
                        dtype=torch.bfloat16)
    target = cache[..., :LATENT_DIM] if latent_only else cache
    slots = torch.randperm(300 * BLOCK_SIZE, device="cuda")[:256]
    slots[::5] = -1
    x = torch.randn(256, 1, target.shape[-1], device="cuda")
    expected = cache.clone()
    write_kv(target, slots, x)
    write_kv_ref(expected[..., :target.shape[-1]], slots, x)
    assert torch.equal(cache, expected)


def _check_mla_bf16(batch: int, max_context: int, **decode_options) -> None:
    """paged_decode (with `decode_options`) against its reference on a random bf16 MLA batch."""
    cache, table, seq_lens = _paged_batch(batch, max_context, 1, LATENT_DIM + ROPE_DIM,
                                          torch.bfloat16, seed=batch)
    q = torch.randn(batch, NUM_HEADS, LATENT_DIM + ROPE_DIM, device="cuda", dtype=torch.bfloat16)
    args = (q, cache, cache[..., :LATENT_DIM], table, seq_lens, 0.1)
    out, lse = paged_decode(*args, **decode_options)
    ref_out, ref_lse = paged_decode_ref(*args)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("batch, max_context", [(1, 8192), (32, 1024), (128, 4096), (256, 8192)])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_paged_decode_mla_bf16(batch, max_context, num_splits):
    _check_mla_bf16(batch, max_context, num_splits=num_splits)


@pytest.mark.parametrize("batch", [96, 128, 256])
def test_paged_decode_mla_short_context_tiles(batch):
    """Short contexts (a host bound <= MAX_SHORT_CONTEXT, as a CUDA graph's length bucket gives)
    take one split of 64-token tiles at 8 warps when the batch fills the GPU (batch 96: below
    ~144 SMs), and give the reference's attention with them."""
    from kernels.paged_decode import MAX_SHORT_CONTEXT, SHORT_CONTEXT_CONFIG, decode_config
    if batch >= 128:  # on any GPU of fewer than ~190 SMs
        assert decode_config(batch, 1, 300, torch.device("cuda")) == SHORT_CONTEXT_CONFIG
    _check_mla_bf16(batch, MAX_SHORT_CONTEXT, config=SHORT_CONTEXT_CONFIG)


@pytest.mark.parametrize("num_blocks", [65536, 240_000])  # 240k x 16 x 576 elements > 2^31
def test_paged_decode_mla_page_16_many_blocks(num_blocks):
    """The runner's page of 16 tokens with a full H200-sized cache: block ids past 2^16, element
    offsets past 2^31 (a benchmark run at batch 128 x 8192 tokens, page 16, stopped with an
    illegal address; the block table there came from a CUDA randperm of 65536)."""
    batch, context, page = 128, 8192, 16
    gen = torch.Generator().manual_seed(num_blocks)  # the permutation on the CPU
    ids = torch.randperm(num_blocks, generator=gen)[-batch * context // page:]  # highest ids too
    table = ids.view(batch, -1).int().cuda()
    cache = torch.randn(num_blocks, page, 1, LATENT_DIM + ROPE_DIM, device="cuda",
                        dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, NUM_HEADS, LATENT_DIM + ROPE_DIM, device="cuda", dtype=torch.bfloat16)
    args = (q, cache, cache[..., :LATENT_DIM], table, seq_lens, 0.1)
    out, lse = paged_decode(*args)
    ref_out, ref_lse = paged_decode_ref(*args)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_gqa(dtype):
    k_cache, table, seq_lens = _paged_batch(64, 2048, 2, 128, dtype, seed=7)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(64, 8, 128, device="cuda", dtype=dtype)
    args = (q, k_cache, v_cache, table, seq_lens, 128 ** -0.5)
    out, lse = paged_decode(*args)
    ref_out, ref_lse = paged_decode_ref(*args)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 8, 128, 256])
@pytest.mark.parametrize("num_groups,topk_group,renormalize", [(1, 1, False), (8, 3, True)])
@pytest.mark.parametrize("num_experts,hidden_size,dtype", [
    (64, 2048, torch.bfloat16),  # DeepSeek-V2-Lite
    (160, 5120, torch.bfloat16),  # DeepSeek-V2
    (64, 2000, torch.float16)])
def test_moe_router(num_tokens, num_groups, topk_group, renormalize, num_experts, hidden_size,
                    dtype):
    """Top-6 routing and a grouped variant in 16 bits. The logits: a split-K GEMM of 16-bit
    tensor-core dots against the reference's fp32 GEMM; tensor-core fp32 sums are not IEEE-exact
    (weights agreed to 2.5e-5 relative at K=5120), hence rtol 1e-4."""
    from kernels.moe_router import moe_route, moe_route_ref
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden_size, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(num_experts, hidden_size, device="cuda", generator=gen)
              * 0.02).to(dtype)
    args = (6, num_groups, topk_group, renormalize, 1.0)
    got_w, got_ids = moe_route(x, weight, *args)
    ref_w, ref_ids = moe_route_ref(x, weight, *args)
    got_order, ref_order = got_ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(got_ids.gather(1, got_order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(got_w.gather(1, got_order), ref_w.gather(1, ref_order),
                               rtol=1e-4, atol=1e-6)


def test_moe_router_batch_invariant():
    """DeepSeek-V2-Lite routing of 128 tokens, then of rows 37..45 alone: the same bits."""
    from kernels.moe_router import moe_route
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(64, 2048, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    batch_w, batch_ids = moe_route(x, weight, 6, 1, 1, False, 1.0)
    alone_w, alone_ids = moe_route(x[37:46].clone(), weight, 6, 1, 1, False, 1.0)
    assert torch.equal(alone_ids, batch_ids[37:46]) and torch.equal(alone_w, batch_w[37:46])


@pytest.mark.parametrize("num_tokens,intermediate_size", [(1, 2816), (128, 1408), (77, 10944)])
def test_silu_mul(num_tokens, intermediate_size):
    """DeepSeek-V2-Lite's shared experts (2816, 1408 per rank at TP2) and dense MLP widths."""
    from kernels.silu_mul import silu_mul, silu_mul_ref
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    gate_up = (torch.randn(num_tokens, 2 * intermediate_size, device="cuda", generator=gen)
               * 3).to(torch.bfloat16)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), rtol=2 ** -6,
                               atol=2 ** -6)


@pytest.mark.parametrize("num_tokens", [1, 128, 256])
def test_mla_norm_rope(num_tokens):
    """DeepSeek-V2-Lite: 16 heads, 512 latent + 64 rope dims, views of one projection output."""
    from kernels.mla_norm_rope import mla_norm_rope, mla_norm_rope_ref
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    q_width = NUM_HEADS * (128 + ROPE_DIM)
    proj = torch.randn(num_tokens, q_width + LATENT_DIM + ROPE_DIM, device="cuda",
                       generator=gen).to(torch.bfloat16)
    q, latent, k_pe = proj.split([q_width, LATENT_DIM, ROPE_DIM], dim=-1)
    q_pe = q.view(num_tokens, NUM_HEADS, 128 + ROPE_DIM)[..., 128:]
    weight = torch.rand(LATENT_DIM, device="cuda", generator=gen).to(torch.bfloat16) + 0.5
    angles = torch.rand(num_tokens, ROPE_DIM // 2, device="cuda", generator=gen) * 100
    args = (latent, k_pe, q_pe, weight, 1e-6, angles.cos(), angles.sin())
    slots = torch.randperm(2 * num_tokens, device="cuda", generator=gen)[:num_tokens]  # pages of 16
    slots[1:2] = -1  # a row another DCP rank stores: not written
    outs = [(torch.empty(num_tokens, LATENT_DIM + ROPE_DIM, device="cuda", dtype=torch.bfloat16),
             torch.empty(num_tokens, NUM_HEADS, LATENT_DIM + ROPE_DIM, device="cuda",
                         dtype=torch.bfloat16)[..., LATENT_DIM:],
             torch.full(((2 * num_tokens + 15) // 16, 16, 1, LATENT_DIM + ROPE_DIM), float("nan"),
                        device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    mla_norm_rope(*args, *outs[0], slots)
    mla_norm_rope_ref(*args, *outs[1], slots)
    for got, want in zip(*outs):  # unwritten cache rows stay NaN on both sides
        torch.testing.assert_close(got, want, rtol=2 ** -6, atol=2 ** -6, equal_nan=True)
    num_written = int((~outs[0][2].isnan().all(dim=-1)).sum())
    assert num_written == int((slots >= 0).sum())


@pytest.mark.parametrize("num_tokens", [1, 128, 256])
def test_gqa_prologue(num_tokens):
    """Qwen2.5-1.5B: 12 query and 2 KV heads of 128, views of one qkv projection output, the
    K and V caches views of one tensor (the Triton backend's layout)."""
    from kernels.gqa_prologue import gqa_prologue, gqa_prologue_ref
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    num_heads, num_kv_heads, head_dim = 12, 2, 128
    qkv = (torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device="cuda",
                       generator=gen) * 3).to(torch.bfloat16)
    qk, v = qkv.split([num_heads + num_kv_heads, num_kv_heads], dim=1)
    angles = torch.rand(num_tokens, head_dim // 2, device="cuda", generator=gen) * 100
    slots = torch.randperm(2 * num_tokens, device="cuda", generator=gen)[:num_tokens]  # pages of 16
    slots[1:2] = -1  # a row another DCP rank stores: not written
    outs = [(torch.empty_like(qk), *torch.full(
        (2, (2 * num_tokens + 15) // 16, 16, num_kv_heads, head_dim), float("nan"), device="cuda",
        dtype=torch.bfloat16)) for _ in range(2)]
    gqa_prologue(qk, v, angles.cos(), angles.sin(), *outs[0], slots)
    gqa_prologue_ref(qk, v, angles.cos(), angles.sin(), *outs[1], slots)
    for got, want in zip(*outs):  # unwritten cache rows stay NaN on both sides
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7, equal_nan=True)
    for cache in outs[0][1:]:  # [blocks, 16, Hkv, D]: a row per written (token, KV head)
        assert int((~cache.isnan().all(dim=-1)).sum()) == num_kv_heads * int((slots >= 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows,vocab_size", [(1, 102400), (128, 102400), (128, 151936)])
def test_greedy_summary(num_rows, vocab_size, dtype):
    """DeepSeek-V2-Lite's and Qwen2.5's vocabularies: ids and maxima exact, log-sum-exp to fp32,
    the argmax also in ids_out."""
    from kernels.greedy_summary import greedy_summary, greedy_summary_ref
    gen = torch.Generator(device="cuda").manual_seed(num_rows)
    logits = (torch.randn(num_rows, vocab_size, device="cuda", generator=gen) * 4).to(dtype)
    ids = torch.full((num_rows,), -1, dtype=torch.int64, device="cuda")
    got, want = greedy_summary(logits, ids_out=ids), greedy_summary_ref(logits)
    assert torch.equal(got[:, :2], want[:, :2])
    assert torch.equal(ids, want[:, 0].long())
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=1e-5)
