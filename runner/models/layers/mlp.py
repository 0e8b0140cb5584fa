"""The gated MLP of Llama/Qwen and DeepSeek: down(silu(gate(x)) * up(x)), gate and up
column-parallel in one fused weight, down row-parallel."""
from __future__ import annotations

import torch
from torch import nn

from kernels.silu_mul import silu_mul, silu_mul_ref
from runner.distributed import GroupHandle
from runner.errors import RunnerError
from runner.models.layers.linear import ColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """A decoder layer's MLP, or DeepSeek's shared experts (`reduce=False`: the MoE does the one
    all-reduce of the layer)."""

    def __init__(self, hidden_size: int, intermediate_size: int, group: GroupHandle,
                 bias: bool = False, reduce: bool = True):
        super().__init__()
        if intermediate_size % group.size:
            raise RunnerError(f"MLP intermediate size {intermediate_size} must be divisible by "
                              f"parallel.tp={group.size}")
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size] * 2, group,
                                                 bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, group, bias=bias,
                                           reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I/tp]: gate, then up
        act = silu_mul(gate_up) if gate_up.is_cuda else silu_mul_ref(gate_up)  # [T, I/tp]
        return self.down_proj(act)
