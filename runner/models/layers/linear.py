"""Linear layers that own their tensor-parallel shard and know how to load it.

Each parameter carries `weight_loader(param, full_tensor, shard_id=None)`: it receives the full
checkpoint tensor (on CPU) and copies only this rank's slice, so the loader stays generic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from runner.distributed import GroupHandle

if TYPE_CHECKING:
    from runner.parallel.plan import HeadShard


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` equal parts of a split dimension. A layer's default is its group's
    (`rank` of `size`); head-sharded layers may hold larger parts (e.g. a DCP group's heads)."""

    count: int
    index: int

    @classmethod
    def of_group(cls, group: GroupHandle) -> Shard:
        return cls(group.size, group.rank)

    @classmethod
    def of_heads(cls, heads: HeadShard, num_total_heads: int) -> Shard:
        """The part holding heads [heads.offset, heads.offset + heads.num_heads) of
        `num_total_heads`."""
        return cls(num_total_heads // heads.num_heads, heads.offset // heads.num_heads)


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _copy_into(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


class ReplicatedLinear(nn.Module):
    """The full weight on every rank (e.g. MLA's latent projection, the MoE router)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _new_param(out_features, in_features)  # [out, in]
        self.weight.weight_loader = _copy_into
        self.bias = _new_param(out_features) if bias else None
        if bias:
            self.bias.weight_loader = _copy_into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split over `group`: rank r holds rows [r*out/n, (r+1)*out/n), or part
    `shard.index` of `shard.count` when a shard is given.

    `output_sizes` lists the sizes of fused sub-matrices (e.g. gate and up); each is split on
    its own so that a rank's shard holds its slice of each, loaded with `shard_id` = index.
    Sub-matrices listed in `replicated_outputs` are held whole on every rank (e.g. MLA's latent
    projection fused after q's head shard: one GEMM). The bias starts at zero, so that a
    sub-matrix without a checkpoint bias adds nothing.
    """

    def __init__(self, in_features: int, output_sizes: list[int], group: GroupHandle,
                 bias: bool = False, shard: Shard | None = None,
                 replicated_outputs: tuple[int, ...] = ()):
        super().__init__()
        self.shard = shard or Shard.of_group(group)
        self.replicated_outputs = replicated_outputs
        for i, size in enumerate(output_sizes):
            if i not in replicated_outputs and size % self.shard.count:
                raise ValueError(f"output size {size} is not divisible into {self.shard.count} "
                                 f"parts")
        self.group = group
        self.local_sizes = [size if i in replicated_outputs else size // self.shard.count
                            for i, size in enumerate(output_sizes)]
        self.weight = _new_param(sum(self.local_sizes), in_features)  # [out/tp, in]
        self.weight.weight_loader = self._load
        self.bias = nn.Parameter(torch.zeros(sum(self.local_sizes)),
                                 requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = self._load

    def _load(self, param: torch.Tensor, full: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:  # one unfused checkpoint tensor covering every output
            if len(self.local_sizes) != 1:
                raise ValueError("a fused column-parallel weight needs a shard_id")
            shard_id = 0
        size = self.local_sizes[shard_id]
        start = sum(self.local_sizes[:shard_id])
        if shard_id not in self.replicated_outputs:
            full = full.narrow(0, self.shard.index * size, size)
        _copy_into(param.data.narrow(0, start, size), full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over `group` (or into `shard.count` parts, this rank holding part
    `shard.index`); partial outputs are summed with an all-reduce over the whole `group`.

    `reduce=False` leaves the sum to the caller (e.g. MoE adds shared and routed experts
    before one all-reduce). The bias is added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, group: GroupHandle,
                 bias: bool = False, reduce: bool = True, shard: Shard | None = None):
        super().__init__()
        self.shard = shard or Shard.of_group(group)
        if in_features % self.shard.count:
            raise ValueError(f"input size {in_features} is not divisible into "
                             f"{self.shard.count} parts")
        self.group = group
        self.reduce = reduce
        self.local_in = in_features // self.shard.count
        self.weight = _new_param(out_features, self.local_in)  # [out, in/tp]
        self.weight.weight_loader = self._load
        self.bias = _new_param(out_features) if bias else None
        if bias:
            self.bias.weight_loader = _copy_into

    def _load(self, param: torch.Tensor, full: torch.Tensor, shard_id: int | None = None) -> None:
        _copy_into(param, full.narrow(1, self.shard.index * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce:
            y = self.group.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
