"""The fused add + RMSNorm kernel (interpreter) against its torch reference and float64 math."""
import pytest
import torch

from kernels.rms_norm import rms_norm, rms_norm_ref


def _float64(x, weight, eps, residual=None):
    s = x.double() + (residual.double() if residual is not None else 0)
    return weight.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps), s


@pytest.mark.parametrize("hidden", [16, 48, 100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference_and_float64(hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=g) * 3
    residual = torch.randn(5, hidden, generator=g) if with_residual else None
    weight = 1 + 0.1 * torch.randn(hidden, generator=g)
    got = rms_norm(x, weight, 1e-5, residual)
    ref = rms_norm_ref(x, weight, 1e-5, residual)
    exact, summed = _float64(x, weight, 1e-5, residual)
    if with_residual:
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
        torch.testing.assert_close(got[1].double(), summed, rtol=1e-6, atol=1e-6)
        got, ref = got[0], ref[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_strided_rows_and_empty_batch():
    x = torch.randn(4, 64)[:, :32]  # rows of stride 64
    weight = torch.rand(32) + 0.5
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6),
                               rtol=1e-5, atol=1e-5)
    assert rms_norm(torch.empty(0, 32), weight, 1e-6).shape == (0, 32)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(torch.randn(4, 32), torch.ones(16), 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference_bitwise_order(dtype):
    x = torch.randn(128, 2048, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(2048, device="cuda")).to(dtype)
    out, summed = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_sum = rms_norm_ref(x, weight, 1e-6, residual)
    torch.testing.assert_close(summed, ref_sum, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)


def test_writes_into_a_strided_view():
    x = torch.randn(4, 32)
    weight = torch.rand(32) + 0.5
    wide = torch.zeros(4, 40)
    rms_norm(x, weight, 1e-6, out=wide[:, :32])
    torch.testing.assert_close(wide[:, :32], rms_norm_ref(x, weight, 1e-6), rtol=1e-5, atol=1e-5)
    assert wide[:, 32:].abs().sum() == 0
