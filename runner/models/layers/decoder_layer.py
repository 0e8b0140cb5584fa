"""The pre-norm decoder layer both model families share: norm, attention, norm, MLP, with the
residual adds fused into the norms."""
from __future__ import annotations

import torch
from torch import nn

from runner.forward_context import ForwardContext
from runner.models.layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's input, the residual stream before it) -> (mlp output, residual)."""
        if residual is None:
            h, residual = self.input_layernorm(hidden), hidden
        else:
            h, residual = self.input_layernorm(hidden, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, ctx), residual)
        return self.mlp(h), residual
