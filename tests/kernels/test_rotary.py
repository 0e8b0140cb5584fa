"""The rotary reference (which the prologue kernels' tests compare against) against a
complex-number rotation, for both pair layouts."""
import pytest
import torch

from kernels.rotary import rotary_ref


def _complex_rotation(x, cos, sin, interleaved):
    xd = x.double()
    if interleaved:
        a, b = xd[..., 0::2], xd[..., 1::2]
    else:
        a, b = xd.chunk(2, dim=-1)
    z = torch.complex(a, b) * torch.complex(cos.double(), sin.double())[:, None, :]
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("num_heads,head_dim", [(1, 16), (3, 64), (5, 12)])
def test_reference_is_a_complex_rotation(interleaved, num_heads, head_dim):
    g = torch.Generator().manual_seed(num_heads * head_dim)
    base = torch.randn(4, num_heads, head_dim + 8, generator=g)
    x = base[..., 4:4 + head_dim]  # strided heads and rows
    angles = torch.randn(4, head_dim // 2, generator=g) * 3
    cos, sin = angles.cos() * 1.2, angles.sin() * 1.2
    got = rotary_ref(x, cos, sin, interleaved)
    torch.testing.assert_close(got.double(), _complex_rotation(x, cos, sin, interleaved),
                               rtol=1e-5, atol=1e-5)
    assert got.dtype == x.dtype
