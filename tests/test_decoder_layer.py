"""The decoder layer's MLP interface: any module works (its output is added to the residual and
normed by the next layer's norm); a module with forward_add_norm is handed that norm instead."""
import torch
from torch import nn

from runner.models.layers.decoder_layer import DecoderLayer, run_decoder_layers
from runner.models.layers.norm import RMSNorm


class _Scale(nn.Module):
    """An attention stand-in: h -> 2 h."""

    def forward(self, h, cos, sin, ctx):
        return 2 * h


class _FusingMLP(nn.Linear):
    def __init__(self):
        super().__init__(8, 8, bias=False)
        self.calls = 0

    def forward_add_norm(self, x, residual, norm):
        self.calls += 1
        return norm(self(x), residual)


def _ref_norm(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def test_plain_and_fusing_mlps_give_the_pre_norm_stack():
    torch.manual_seed(0)
    plain = nn.Linear(8, 8, bias=False)
    fusing = _FusingMLP()
    layers = nn.ModuleList(DecoderLayer(_Scale(), mlp, 8, 1e-6) for mlp in (plain, fusing))
    final_norm = RMSNorm(8, 1e-6)
    for norm in (final_norm, *(n for layer in layers
                               for n in (layer.input_layernorm, layer.post_attention_layernorm))):
        norm.weight.data.uniform_(0.5, 1.5)
    hidden = torch.randn(3, 8)
    got = run_decoder_layers(layers, final_norm, hidden, None, None, None)
    stream = hidden  # the residual stream, in float32 throughout
    for layer in layers:
        stream = stream + 2 * _ref_norm(layer.input_layernorm, stream)
        stream = stream + layer.mlp(_ref_norm(layer.post_attention_layernorm, stream))
    torch.testing.assert_close(got, _ref_norm(final_norm, stream))
    assert fusing.calls == 1
