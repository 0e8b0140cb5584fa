"""Paged KV store: kernel vs torch reference vs a per-token Python loop."""
import pytest
import torch

from kernels.kv_write import write_kv, write_kv_ref


def _write_loop(cache, slots, x):
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            cache[slot // cache.shape[1], slot % cache.shape[1]] = x[token].to(cache.dtype)


@pytest.mark.parametrize("num_kv_heads, head_dim, dtype", [
    (2, 64, torch.float32), (1, 576, torch.float32), (2, 80, torch.bfloat16)])
def test_matches_loop_and_skips_negative_slots(num_kv_heads, head_dim, dtype):
    num_blocks, block_size = 3, 4
    slots = torch.tensor([5, -1, 0, 11, -1, 7])
    x = torch.randn(len(slots), num_kv_heads, head_dim)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype)
              for _ in range(3)]
    write_kv(caches[0], slots, x)
    write_kv_ref(caches[1], slots, x)
    _write_loop(caches[2], slots, x)
    assert torch.equal(caches[1], caches[2])
    # The interpreter truncates fp32 -> bf16 where the GPU rounds: allow one bf16 step.
    step = 0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(caches[0].float(), caches[2].float(), atol=0, rtol=step)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (caches[0].view(-1, num_kv_heads, head_dim)[untouched] == 7.0).all()


def test_strided_prefix_view_of_a_wider_cache():
    cache = torch.full((4, 4, 1, 576), 3.0)
    latent = torch.randn(5, 1, 512)
    slots = torch.tensor([2, 9, -1, 15, 0])
    write_kv(cache[..., :512], slots, latent)
    expected = torch.full((4, 4, 1, 576), 3.0)
    _write_loop(expected[..., :512], slots, latent)
    assert torch.equal(cache, expected)
    assert (cache[..., 512:] == 3.0).all()


def test_strided_source_rows():
    cache = torch.zeros(2, 4, 2, 16)
    x = torch.randn(3, 16, 2).transpose(1, 2)  # [3, 2, 16], not contiguous
    slots = torch.tensor([1, 6, -1])
    write_kv(cache, slots, x)
    expected = torch.zeros(2, 4, 2, 16)
    _write_loop(expected, slots, x)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("cache, slots, x, match", [
    (torch.zeros(2, 4, 16), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, 16), "cache"),
    (torch.zeros(2, 4, 1, 16), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 2, 16), "x"),
    (torch.zeros(2, 4, 1, 16), torch.zeros(1, dtype=torch.int32), torch.zeros(1, 1, 16), "slots"),
    (torch.zeros(2, 4, 1, 16), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 1, 16), "slots"),
])
def test_bad_inputs_raise(cache, slots, x, match):
    with pytest.raises(ValueError, match=match):
        write_kv(cache, slots, x)
