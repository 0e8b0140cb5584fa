"""The rotary kernel (interpreter) against its torch reference and a complex-number rotation."""
import pytest
import torch

from kernels.rotary import rotary, rotary_ref


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
def test_matches_reference_and_complex_math(interleaved, num_heads, head_dim):
    g = torch.Generator().manual_seed(num_heads * head_dim)
    base = torch.randn(4, num_heads, head_dim + 8, generator=g)
    x = base[..., 4:4 + head_dim]  # strided heads and rows
    angles = torch.randn(4, head_dim // 2, generator=g) * 3
    cos, sin = angles.cos() * 1.2, angles.sin() * 1.2
    got = rotary(x, cos, sin, interleaved)
    torch.testing.assert_close(got, rotary_ref(x, cos, sin, interleaved), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _complex_rotation(x, cos, sin, interleaved),
                               rtol=1e-5, atol=1e-5)


def test_rejects_odd_dim():
    with pytest.raises(ValueError, match="rotary"):
        rotary(torch.randn(2, 1, 5), torch.randn(2, 2), torch.randn(2, 2), True)


def test_writes_into_a_strided_view():
    """`out` may be a slice of a wider buffer (the MLA cache row / absorbed query)."""
    from kernels.rotary import rotary, rotary_ref
    x = torch.randn(3, 2, 8)
    cos, sin = torch.rand(3, 4), torch.rand(3, 4)
    wide = torch.zeros(3, 2, 20)
    rotary(x, cos, sin, interleaved=True, out=wide[:, :, 12:])
    torch.testing.assert_close(wide[:, :, 12:], rotary_ref(x, cos, sin, interleaved=True))
    assert wide[:, :, :12].abs().sum() == 0
