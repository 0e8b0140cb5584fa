"""Exact combine of partial attention states: kernel vs torch reference vs float64 math
(only the parts with a finite LSE count; a row with none is out 0, lse -inf)."""
import math

import pytest
import torch

from kernels.merge_states import merge_states, merge_states_ref, scale_own, scale_own_ref

INF = float("inf")


def _merge_f64(outs, lses):
    """Float64 merge, one (token, head) row at a time, from the definition."""
    num_states, num_tokens, num_heads, head_dim = outs.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((num_tokens, num_heads), -INF, dtype=torch.float64)
    for t in range(num_tokens):
        for h in range(num_heads):
            parts = [n for n in range(num_states) if math.isfinite(lses[n, t, h])]
            if not parts:
                continue
            top = max(float(lses[n, t, h]) for n in parts)
            lse[t, h] = top + math.log(sum(math.exp(float(lses[n, t, h]) - top) for n in parts))
            for n in parts:
                out[t, h] += math.exp(float(lses[n, t, h]) - lse[t, h]) * outs[n, t, h].double()
    return out, lse


def _check(outs, lses, atol=1e-5):
    want_out, want_lse = _merge_f64(outs, lses)
    for out, lse in (merge_states(outs, lses), merge_states_ref(outs, lses)):
        assert out.dtype == outs.dtype and lse.dtype == torch.float32
        assert not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=atol)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
        own_sum = sum(scale_own(outs[n], lses, n)[0].double() for n in range(outs.shape[0]))
        torch.testing.assert_close(own_sum, want_out, atol=atol, rtol=atol)
        for n in range(outs.shape[0]):
            scaled, own_lse = scale_own(outs[n], lses, n)
            ref_scaled, _ = scale_own_ref(outs[n], lses, n)
            assert not scaled.isnan().any()
            torch.testing.assert_close(scaled, ref_scaled, atol=atol, rtol=atol)
            torch.testing.assert_close(own_lse.double(), want_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("num_states, head_dim", [(1, 64), (3, 576), (3, 80), (4, 512), (5, 16)])
def test_random_states(num_states, head_dim):
    gen = torch.Generator().manual_seed(num_states * 1000 + head_dim)
    outs = torch.randn(num_states, 2, 3, head_dim, generator=gen)
    lses = torch.randn(num_states, 2, 3, generator=gen) * 3
    _check(outs, lses)


def test_single_state_is_the_identity():
    outs, lses = torch.randn(1, 3, 2, 80), torch.randn(1, 3, 2)
    out, lse = merge_states(outs, lses)
    torch.testing.assert_close(out, outs[0])
    torch.testing.assert_close(lse, lses[0])


def test_equal_lses_average_the_outputs():
    outs = torch.randn(4, 2, 2, 576)
    lses = torch.full((4, 2, 2), 1.5)
    out, lse = merge_states(outs, lses)
    torch.testing.assert_close(out, outs.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, torch.full((2, 2), 1.5 + math.log(4)))


def test_dominant_state_wins_and_large_lses_do_not_overflow():
    outs = torch.randn(3, 1, 2, 80)
    lses = torch.tensor([[[1000.0, -5.0]], [[1060.0, 20.0]], [[990.0, 80.0]]])
    out, lse = merge_states(outs, lses)
    torch.testing.assert_close(out[0, 0], outs[1, 0, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0, 1], outs[2, 0, 1], atol=1e-6, rtol=1e-5)
    _check(outs, lses)


def test_empty_states_count_as_nothing_even_with_nan_outputs():
    outs = torch.randn(3, 2, 4, 80)
    lses = torch.randn(3, 2, 4)
    outs[:, 0, 0] = float("nan")  # token 0 head 0: every state empty
    lses[:, 0, 0] = -INF
    outs[1, 1] = float("nan")  # state 1 empty for token 1 (NaN, +inf and -inf lse)
    lses[1, 1] = torch.tensor([float("nan"), INF, -INF, -INF])
    outs[:, 0, 1] = float("nan")  # token 0 head 1: empty through NaN / +inf lses
    lses[:, 0, 1] = torch.tensor([float("nan"), INF, -INF])
    out, lse = merge_states(outs, lses)
    assert (out[0, :2] == 0).all() and (lse[0, :2] == -INF).all()
    _check(outs, lses)


def test_bfloat16_outputs_and_strided_inputs():
    wide = torch.randn(3, 2, 4, 600)
    outs = wide[..., :576].to(torch.bfloat16)
    lses = torch.randn(2, 4, 3).permute(2, 0, 1)  # [3, 2, 4], not contiguous
    _check(outs, lses, atol=1e-2)
    out, _ = merge_states(outs, lses, out_dtype=torch.float32)
    assert out.dtype == torch.float32


def test_empty_batch():
    out, lse = merge_states(torch.empty(2, 0, 4, 8), torch.empty(2, 0, 4))
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


@pytest.mark.parametrize("outs, lses, match", [
    (torch.zeros(2, 3, 4), torch.zeros(2, 3), "outs"),
    (torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4, dtype=torch.float64), "lses"),
    (torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 5), "lses"),
])
def test_bad_inputs_raise(outs, lses, match):
    with pytest.raises(ValueError, match=match):
        merge_states(outs, lses)
    with pytest.raises(ValueError, match="own_rank"):
        scale_own(torch.zeros(3, 4, 8), torch.zeros(2, 3, 4), own_rank=2)
