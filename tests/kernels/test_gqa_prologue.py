"""GQA's fused rotary + cache write kernel (interpreter) against its torch reference, which is the
model's unfused path (rotary_ref, then write_kv_ref of K and of V): strided views of one qkv
projection as LlamaAttention passes them, GQA and MHA head counts, ragged head dims, bf16
rounding, skipped slots left untouched, an empty batch, bad shapes."""
import pytest
import torch

from kernels.gqa_prologue import gqa_prologue, gqa_prologue_ref

BLOCK_SIZE = 4


def _inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed):
    """qk and v: views of one projection output [T, Hq + 2 Hkv, D]; cos/sin [T, D/2]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g) * 3
    qkv = qkv.to(dtype)
    angles = torch.rand(num_tokens, head_dim // 2, generator=g) * 6
    num_qk_heads = num_heads + num_kv_heads
    return qkv[:, :num_qk_heads], qkv[:, num_qk_heads:], angles.cos(), angles.sin()


def _outputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """qk_out [T, Hq + Hkv, D], NaN-filled K and V caches (views of one [2, blocks, 4, Hkv, D]
    tensor, as the Triton backend lays them out) and slots [T] shuffled, the second one -1."""
    qk_out = torch.full((num_tokens, num_heads + num_kv_heads, head_dim), float("nan"),
                        dtype=dtype)
    num_blocks = num_tokens // BLOCK_SIZE + 2
    caches = torch.full((2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"),
                        dtype=dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE,
                           generator=torch.Generator().manual_seed(num_tokens))[:num_tokens]
    slots[1:2] = -1
    return qk_out, caches[0], caches[1], slots


@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim", [
    (3, 12, 2, 128),  # Qwen2.5-1.5B
    (5, 3, 3, 12),  # MHA, a head dim whose half is no power of two
    (2, 6, 1, 8),
    (1, 1, 1, 2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("write_cache", [True, False])
def test_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, dtype, write_cache):
    qk, v, cos, sin = _inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=head_dim)
    qk_out, k_cache, v_cache, slots = _outputs(num_tokens, num_heads, num_kv_heads, head_dim,
                                               dtype)
    want_out, want_k, want_v, _ = _outputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    caches = (k_cache, v_cache) if write_cache else (None, None)
    gqa_prologue(qk, v, cos, sin, qk_out, *caches, slots)
    gqa_prologue_ref(qk, v, cos, sin, want_out, *((want_k, want_v) if write_cache else
                                                  (None, None)), slots)
    assert not qk_out.isnan().any()
    # bf16: one rounding each, but the interpreter's float32 -> bf16 cast may differ by an ulp
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(qk_out, want_out, rtol=tol, atol=tol)
    for got, want in ((k_cache, want_k), (v_cache, want_v)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    kept = (slots >= 0) & write_cache
    k_rows = k_cache.view(-1, num_kv_heads, head_dim)  # [blocks * B, Hkv, D]
    v_rows = v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(k_rows[slots[kept]], qk_out[kept, num_heads:])  # the rotated keys
    assert torch.equal(v_rows[slots[kept]], v[kept])
    untouched = k_rows.isnan().all(dim=(1, 2)) & v_rows.isnan().all(dim=(1, 2))
    assert int(untouched.sum()) == k_rows.shape[0] - int(kept.sum())  # nothing else written


def test_empty_batch_and_bad_shapes():
    gqa_prologue(*_inputs(0, 4, 2, 8, torch.float32, seed=0),
                 *_outputs(0, 4, 2, 8, torch.float32))
    qk, v, cos, sin = _inputs(2, 4, 2, 8, torch.float32, seed=1)
    qk_out, k_cache, v_cache, slots = _outputs(2, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="qk must be"):
        gqa_prologue(qk[:, :, :6], v, cos, sin, qk_out, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="cos/sin"):
        gqa_prologue(qk, v, cos[:, :1], sin[:, :1], qk_out, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="qk_out must be"):
        gqa_prologue(qk, v, cos, sin, qk_out.double(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        gqa_prologue(qk, v, cos, sin, qk_out, k_cache[..., :4], v_cache, slots)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        gqa_prologue(qk, v, cos, sin, qk_out, k_cache, None, slots)
    with pytest.raises(ValueError, match="slots must be"):
        gqa_prologue(qk, v, cos, sin, qk_out, k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="must not share"):
        gqa_prologue(qk, v, cos, sin, qk, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="one device"):
        gqa_prologue(qk, v, cos, sin, qk_out, k_cache.to("meta"), v_cache.to("meta"), slots)
