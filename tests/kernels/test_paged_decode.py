"""Split-KV paged decode: kernel and torch reference vs dense float64 softmax attention over
each request's tokens, written into a NaN-filled paged cache through a shuffled block table."""
import math

import pytest
import torch

from kernels.paged_decode import (MAX_SHORT_CONTEXT, SHORT_CONTEXT_CONFIG, DecodeConfig,
                                  gpu_decode_config, paged_decode, paged_decode_ref)


def _decode_case(seq_lens, num_heads, num_kv_heads, head_dim_k, head_dim_v, mla, block_size,
                 dtype=torch.float32, seed=0):
    """q, caches, block table, seq_lens, and each request's own (k, v) tokens."""
    gen = torch.Generator().manual_seed(seed)
    num_reqs = len(seq_lens)
    max_blocks = max(-(-length // block_size) for length in seq_lens) + 1
    num_blocks = num_reqs * max_blocks + 2
    table = torch.randperm(num_blocks, generator=gen)[:num_reqs * max_blocks].view(
        num_reqs, max_blocks).int()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim_k), float("nan"),
                         dtype=dtype)
    v_cache = (k_cache[..., :head_dim_v] if mla else
               torch.full((num_blocks, block_size, num_kv_heads, head_dim_v), float("nan"),
                          dtype=dtype))
    tokens = []
    for req, length in enumerate(seq_lens):
        k = torch.randn(length, num_kv_heads, head_dim_k, generator=gen).to(dtype)
        v = k[..., :head_dim_v] if mla else torch.randn(
            length, num_kv_heads, head_dim_v, generator=gen).to(dtype)
        for p in range(length):
            k_cache[table[req, p // block_size], p % block_size] = k[p]
            v_cache[table[req, p // block_size], p % block_size] = v[p]
        table[req, -(-length // block_size):] = -1  # unused entries must never be read
        tokens.append((k, v))
    q = torch.randn(num_reqs, num_heads, head_dim_k, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32), tokens


def _dense_f64(q, tokens, scale):
    """Softmax attention per request and head in float64; no keys -> out 0, lse -inf."""
    num_reqs, num_heads, _ = q.shape
    outs, lses = [], []
    for req, (k, v) in enumerate(tokens):
        group = num_heads // k.shape[1]
        kv_of_head = torch.arange(num_heads) // group
        if k.shape[0] == 0:
            outs.append(torch.zeros(num_heads, v.shape[-1], dtype=torch.float64))
            lses.append(torch.full((num_heads,), -math.inf, dtype=torch.float64))
            continue
        keys = k.double()[:, kv_of_head].transpose(0, 1)  # [H, L, Dk]
        values = v.double()[:, kv_of_head].transpose(0, 1)  # [H, L, Dv]
        scores = (keys @ q[req].double()[:, :, None])[..., 0] * scale  # [H, L]
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append((torch.softmax(scores, dim=-1)[:, None, :] @ values)[:, 0])
    return torch.stack(outs), torch.stack(lses)


def _check(case, scale, num_splits, atol):
    q, k_cache, v_cache, table, seq_lens, tokens = case
    want_out, want_lse = _dense_f64(q, tokens, scale)
    results = [paged_decode(q, k_cache, v_cache, table, seq_lens, scale, num_splits),
               paged_decode_ref(q, k_cache, v_cache, table, seq_lens, scale)]
    for out, lse in results:
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        assert not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=atol)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_many_heads_one_latent(num_splits):
    case = _decode_case([0, 1, 7, 21], 16, 1, 576, 512, mla=True, block_size=4)
    _check(case, 576 ** -0.5, num_splits, atol=1e-5)


@pytest.mark.parametrize("num_splits", [None, 2, 8])
def test_gqa_groups(num_splits):
    case = _decode_case([5, 0, 17], 8, 2, 64, 64, mla=False, block_size=8, seed=1)
    _check(case, 0.125, num_splits, atol=1e-5)


@pytest.mark.parametrize("block_size", [3, 4, 16, 32, 64])
@pytest.mark.parametrize("mla", [True, False])
def test_page_sizes_smaller_larger_and_not_dividing_the_tile(block_size, mla):
    """Tiles of 16 tokens (32 for the explicit config) over pages that divide them, pages they
    divide (a tile starts inside a page) and pages of 3 tokens (the per-token path)."""
    head_dim_k, head_dim_v = (40, 32) if mla else (32, 24)
    case = _decode_case([0, 1, 5, 33, 70], 4, 1 if mla else 2, head_dim_k, head_dim_v, mla=mla,
                        block_size=block_size, seed=block_size)
    q, k_cache, v_cache, table, seq_lens, tokens = case
    want_out, want_lse = _dense_f64(q, tokens, 0.2)
    for config in (None, DecodeConfig(16, 3, 1, 1), DecodeConfig(32, 2, 1, 1)):
        out, lse = paged_decode(q, k_cache, v_cache, table, seq_lens, 0.2, config=config)
        torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_explicit_config(monkeypatch):
    """A given config (the MLA decode bench's tuning sweep passes one) replaces decode_config:
    32-token tiles over 4-token pages, 2 splits."""
    import kernels.paged_decode

    def no_default(*args):
        raise AssertionError("decode_config called although a config was given")
    monkeypatch.setattr(kernels.paged_decode, "decode_config", no_default)
    q, k_cache, v_cache, table, seq_lens, tokens = _decode_case([0, 5, 40], 16, 1, 576, 512,
                                                                mla=True, block_size=4, seed=5)
    out, lse = paged_decode(q, k_cache, v_cache, table, seq_lens, 0.1,
                            config=DecodeConfig(32, 2, 1, 1))
    want_out, want_lse = _dense_f64(q, tokens, 0.1)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_head_dims_not_powers_of_two_and_different_v_dim():
    case = _decode_case([3, 9], 2, 2, 80, 48, mla=False, block_size=4, seed=2)
    _check(case, 80 ** -0.5, 2, atol=1e-5)


def test_more_heads_than_one_program_holds():
    case = _decode_case([6, 2], 72, 1, 32, 32, mla=False, block_size=4, seed=3)
    _check(case, 0.2, 1, atol=1e-5)


def test_bfloat16_mla():
    case = _decode_case([1, 9, 30], 16, 1, 576, 512, mla=True, block_size=8,
                        dtype=torch.bfloat16, seed=4)
    _check(case, 576 ** -0.5, 2, atol=2e-2)


def test_empty_batch():
    q, k_cache, v_cache, table, seq_lens, _ = _decode_case([2], 4, 1, 16, 16, False, 4)
    out, lse = paged_decode(q[:0], k_cache, v_cache, table[:0], seq_lens[:0], 0.25)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.zeros(1, 3, 16)), "multiple"),
    (dict(q=torch.zeros(1, 4, 16, dtype=torch.float64)), "q must"),
    (dict(k_cache=torch.zeros(3, 4, 2, 8)), "k_cache"),
    (dict(v_cache=torch.zeros(3, 2, 2, 16)), "v_cache"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int64)), "block_table"),
    (dict(seq_lens=torch.zeros(2, dtype=torch.int32)), "seq_lens"),
    (dict(num_splits=0), "num_splits"),
])
def test_bad_inputs_raise(change, match):
    args = dict(q=torch.zeros(1, 4, 16), k_cache=torch.zeros(3, 4, 2, 16),
                v_cache=torch.zeros(3, 4, 2, 16), block_table=torch.zeros(1, 2, dtype=torch.int32),
                seq_lens=torch.zeros(1, dtype=torch.int32), scale=0.25) | change
    with pytest.raises(ValueError, match=match):
        paged_decode(**args)


def test_gpu_decode_config_short_contexts_take_one_split_when_the_batch_fills_the_gpu():
    assert gpu_decode_config(128, 300, num_sms=132) == SHORT_CONTEXT_CONFIG
    assert gpu_decode_config(128, MAX_SHORT_CONTEXT, num_sms=132) == SHORT_CONTEXT_CONFIG
    # longer bounds, or a batch that leaves SMs idle: split-KV over 64-token tiles, up to two
    # programs per SM and splits of at least MIN_SPLIT_TOKENS (128) tokens of the bound
    assert gpu_decode_config(128, MAX_SHORT_CONTEXT + 1, num_sms=132) == DecodeConfig(64, 2, 4, 2)
    assert gpu_decode_config(8, 300, num_sms=132) == DecodeConfig(64, 3, 4, 2)
    assert gpu_decode_config(8, 2048, num_sms=132) == DecodeConfig(64, 16, 4, 2)
    assert gpu_decode_config(1, 8192, num_sms=132) == DecodeConfig(64, 32, 4, 2)
    assert gpu_decode_config(128, 300, num_sms=132, num_splits=2) == DecodeConfig(64, 2, 4, 2)


@pytest.mark.parametrize("max_seq_len", [1, 21, 1000])
def test_a_length_bound_picks_tiles_only(max_seq_len):
    """max_seq_len (a graph's length bucket) chooses the launch; it never cuts a sequence, even
    when a caller's bound is too small."""
    q, k_cache, v_cache, table, seq_lens, tokens = _decode_case(
        [0, 3, 21, 9], 16, 1, 576, 512, mla=True, block_size=4, seed=2)
    want_out, want_lse = _dense_f64(q, tokens, 0.05)
    out, lse = paged_decode(q, k_cache, v_cache, table, seq_lens, 0.05, max_seq_len=max_seq_len)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
