"""The pre-norm decoder layer both model families share: norm, attention, norm, MLP, with the
residual adds fused into the norms, and the loop over the layers."""
from __future__ import annotations

import torch
from torch import nn

from runner.forward_context import ForwardContext
from runner.models.layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    """Runs from its input norm's output to the next norm's: the model applies the first layer's
    input_layernorm, and each layer ends with the next one's (or the final norm), so that the MLP
    may fuse its last step with it."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, ctx: ForwardContext,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_layernorm's output, the residual stream before this layer) -> (next_norm's
        output, the residual stream after this layer)."""
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, ctx), residual)
        return self.mlp(h, residual, next_norm)


def run_layers(layers: nn.ModuleList, final_norm: RMSNorm, hidden: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The embeddings [T, H] through every layer -> final_norm's output [T, H]."""
    h, residual = layers[0].input_layernorm(hidden), hidden
    next_norms = [layer.input_layernorm for layer in layers[1:]] + [final_norm]
    for layer, next_norm in zip(layers, next_norms):
        h, residual = layer(h, residual, cos, sin, ctx, next_norm)
    return h
