"""The silu-and-mul kernel (interpreter) against its torch reference: ragged column tiles,
strided rows, bf16 rounding as torch's, empty batch, bad shapes."""
import pytest
import torch

from kernels.silu_mul import silu_mul, silu_mul_ref


@pytest.mark.parametrize("intermediate_size", [8, 40, 1100])  # 1100: a partial second tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(intermediate_size, dtype):
    g = torch.Generator().manual_seed(intermediate_size)
    gate_up = (torch.randn(3, 2 * intermediate_size, generator=g) * 4).to(dtype)
    got = silu_mul(gate_up)
    assert got.shape == (3, intermediate_size) and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -6  # bf16: each of 2 roundings may differ
    torch.testing.assert_close(got, silu_mul_ref(gate_up), rtol=tol, atol=tol)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), torch.nn.functional.silu(gate) * up,
                               rtol=2 * tol, atol=tol)


def test_strided_rows_and_empty_batch():
    wide = torch.randn(4, 100)
    gate_up = wide[:, :64]  # rows 100 apart
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), rtol=1e-6, atol=1e-6)
    assert silu_mul(torch.empty(0, 64)).shape == (0, 32)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(torch.randn(8, 4).t())
