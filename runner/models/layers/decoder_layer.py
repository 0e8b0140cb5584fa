"""The pre-norm decoder layer both model families share: norm, attention, norm, MLP, with the
residual adds fused into the norms. Each layer ends with the NEXT layer's input norm (the last
layer with the model's final norm), so that an MLP can fuse that add and norm into its own last
kernel (DeepSeek's MoE on one rank does)."""
from __future__ import annotations

import torch
from torch import nn

from runner.forward_context import ForwardContext
from runner.models.layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        """mlp: any module of x [T, H] -> [T, H]; one with forward_add_norm(x, residual, norm) ->
        (norm(mlp(x) + residual), the sum) may fuse that add and norm (DeepseekMoE does)."""
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, ctx: ForwardContext, next_norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's normed input, the residual stream before the layer) -> (next_norm of
        the stream after it, that stream)."""
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, ctx), residual)
        forward_add_norm = getattr(self.mlp, "forward_add_norm", None)
        if forward_add_norm is not None:
            return forward_add_norm(h, residual, next_norm)
        return next_norm(self.mlp(h), residual)


def run_decoder_layers(layers: nn.ModuleList, final_norm: RMSNorm, hidden: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext
                       ) -> torch.Tensor:
    """The embeddings [T, H] through every layer -> the final norm's output [T, H]."""
    h, residual = layers[0].input_layernorm(hidden), hidden
    next_norms = [layer.input_layernorm for layer in layers[1:]] + [final_norm]
    for layer, next_norm in zip(layers, next_norms):
        h, residual = layer(h, residual, cos, sin, ctx, next_norm)
    return h
