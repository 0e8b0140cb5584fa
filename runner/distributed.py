"""Process-group handles (world, tp, dcp inside tp, ep) and the collectives the model uses.

A `GroupHandle` of size 1 makes every collective the identity, so single-rank code runs the
same program as a parallel one. Gathered and scattered tensors are stacked on dim 0 (gloo's
requirement), then moved to the requested dim.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# every process group's: a collective (or group creation) that waits longer fails the run
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("DCP_RUNNER_COLLECTIVE_TIMEOUT", 600)))


@dataclass
class GroupHandle:
    """One process group as seen from this rank."""

    size: int = 1
    rank: int = 0  # rank inside the group
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate the ranks' `x` along `dim`, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if x.dim() == 0:
            x = x.view(1)
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_into_tensor(out, x, group=self.group)  # rank blocks stacked on dim 0
        if dim == 0:
            return out
        return torch.cat(out.chunk(self.size, dim=0), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, then keep this rank's slice of `dim` (split into `size` equal parts)."""
        if self.size == 1:
            return x
        chunks = x.chunk(self.size, dim=dim)
        stacked = torch.cat([c.contiguous() for c in chunks], dim=0) if dim != 0 else x.contiguous()
        out = torch.empty(chunks[0].shape, dtype=x.dtype, device=x.device)
        _reduce_scatter_tensor(out, stacked, group=self.group)  # rank blocks stacked on dim 0
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [size, ...]: slice j goes to rank j; returns [size, ...] with slice j from rank j."""
        if self.size == 1:
            return x
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=self.group)
        return out

    def broadcast_object(self, obj: object, src_rank: int = 0) -> object:
        """Send a picklable object from group rank `src_rank` to every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group_src=src_rank, group=self.group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The minimum of an integer over the group (e.g. the KV block count every rank uses)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_device_of(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def _device_of(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# NOTE: torch 2.13 renames these collectives (the old names warn); the GPU image's torch 2.11
# has only the old names. Looked up at call time, so wrappers of torch.distributed see the calls.
def _all_gather_into_tensor(out: torch.Tensor, x: torch.Tensor, group) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_tensor(out: torch.Tensor, x: torch.Tensor, group) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x,
                                                                                group=group)
