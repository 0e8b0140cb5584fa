"""MLA's fused norm + rotary kernel (interpreter) against its torch reference, which is the
model's unfused path: strided views in and out as the model passes them, many heads, ragged
latent and rope widths, bf16 rounding, the paged cache write (skipped slots left untouched), an
empty batch, bad shapes."""
import pytest
import torch

from kernels.mla_norm_rope import mla_norm_rope, mla_norm_rope_ref


def _inputs(num_tokens, num_heads, latent_size, rope_dim, dtype, seed):
    """Views of one projection output [T, q | latent | k_pe] and of the absorbed query, as in
    MLAAttention.forward."""
    g = torch.Generator().manual_seed(seed)
    q_width = num_heads * (8 + rope_dim)
    proj = torch.randn(num_tokens, q_width + latent_size + rope_dim, generator=g).to(dtype)
    q, latent, k_pe = proj.split([q_width, latent_size, rope_dim], dim=-1)
    q_pe = q.view(num_tokens, num_heads, 8 + rope_dim)[..., 8:]
    weight = (1 + torch.randn(latent_size, generator=g) / 4).to(dtype)
    angles = torch.rand(num_tokens, rope_dim // 2, generator=g) * 6
    return latent, k_pe, q_pe, weight, 1e-6, angles.cos(), angles.sin()


BLOCK_SIZE = 4


def _outputs(num_tokens, num_heads, latent_size, rope_dim, dtype):
    """kv_out [T, C + R], q_pe_out (the rope columns of [T, H, C + R]), a NaN-filled paged cache
    [blocks, 4, 1, C + R] and slots [T] in shuffled order, the second one -1 (skipped)."""
    kv = torch.full((num_tokens, 1, latent_size + rope_dim), float("nan"), dtype=dtype)
    q_absorbed = torch.full((num_tokens, num_heads, latent_size + rope_dim), float("nan"),
                            dtype=dtype)
    num_blocks = num_tokens // BLOCK_SIZE + 2
    cache = torch.full((num_blocks, BLOCK_SIZE, 1, latent_size + rope_dim), float("nan"),
                       dtype=dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE,
                           generator=torch.Generator().manual_seed(num_tokens))[:num_tokens]
    slots[1:2] = -1
    return kv[:, 0], q_absorbed[:, :, latent_size:], cache, slots


@pytest.mark.parametrize("num_tokens, num_heads, latent_size, rope_dim", [
    (3, 16, 512, 64),  # DeepSeek-V2-Lite
    (5, 3, 40, 6),  # ragged widths: no power of two anywhere
    (1, 1, 8, 2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("write_cache", [True, False])
def test_matches_reference(num_tokens, num_heads, latent_size, rope_dim, dtype, write_cache):
    inputs = _inputs(num_tokens, num_heads, latent_size, rope_dim, dtype, seed=latent_size)
    got = _outputs(num_tokens, num_heads, latent_size, rope_dim, dtype)
    want = _outputs(num_tokens, num_heads, latent_size, rope_dim, dtype)
    kv_out, _, cache, slots = got
    # without a cache (the attention backend writes it), the cache is left untouched
    mla_norm_rope(*inputs, *got[:2], cache if write_cache else None, slots)
    mla_norm_rope_ref(*inputs, *want[:2], want[2] if write_cache else None, want[3])
    # bf16: the norm rounds twice (normed, then times the weight); each may differ by an ulp
    tol = 1e-6 if dtype == torch.float32 else 2 ** -6
    for g, w in zip(got[:2], want[:2]):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    rows = cache.view(-1, kv_out.shape[1])  # [blocks * B, C + R]
    kept = (slots >= 0) & write_cache
    assert torch.equal(rows[slots[kept]], kv_out[kept])  # the cache row is the kv_out row
    assert rows.isnan().all(dim=1).sum() == rows.shape[0] - int(kept.sum())  # nothing else
    torch.testing.assert_close(cache, want[2], rtol=tol, atol=tol, equal_nan=True)


def test_empty_batch_and_bad_shapes():
    inputs = _inputs(0, 2, 16, 4, torch.float32, seed=0)
    mla_norm_rope(*inputs, *_outputs(0, 2, 16, 4, torch.float32))
    latent, k_pe, q_pe, weight, eps, cos, sin = _inputs(2, 2, 16, 4, torch.float32, seed=1)
    kv_out, q_pe_out, cache, slots = _outputs(2, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        mla_norm_rope(latent, k_pe, q_pe, weight[:8], eps, cos, sin, kv_out, q_pe_out, cache,
                      slots)
    with pytest.raises(ValueError, match="cos/sin"):
        mla_norm_rope(latent, k_pe, q_pe, weight, eps, cos[:, :1], sin[:, :1], kv_out, q_pe_out,
                      cache, slots)
    with pytest.raises(ValueError, match="kv_out"):
        mla_norm_rope(latent, k_pe, q_pe, weight, eps, cos, sin, kv_out[:, :16], q_pe_out, cache,
                      slots)
    with pytest.raises(ValueError, match="q_pe_out must be"):
        mla_norm_rope(latent, k_pe, q_pe, weight, eps, cos, sin, kv_out, q_pe_out.double(),
                      cache, slots)
    with pytest.raises(ValueError, match="cache must be"):
        mla_norm_rope(latent, k_pe, q_pe, weight, eps, cos, sin, kv_out, q_pe_out,
                      cache[..., :16], slots)
    with pytest.raises(ValueError, match="one device"):
        mla_norm_rope(latent, k_pe, q_pe, weight, eps, cos, sin, kv_out, q_pe_out,
                      cache.to("meta"), slots)
    with pytest.raises(ValueError, match="slots must be"):
        mla_norm_rope(latent, k_pe, q_pe, weight, eps, cos, sin, kv_out, q_pe_out, cache,
                      slots.int())
