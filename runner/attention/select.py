"""`attention=auto|torch|triton`: pick the backend for the device."""
from __future__ import annotations

import torch

from runner.errors import RunnerError

NAMES = ("auto", "torch", "triton")


def select_backend(name: str, device: torch.device | None = None):
    if name not in NAMES:
        raise RunnerError(f"attention.name={name!r}: allowed {', '.join(NAMES)}")
    on_gpu = device is not None and device.type == "cuda"
    if name == "triton" or (name == "auto" and on_gpu):
        if not on_gpu:
            raise RunnerError("attention=triton needs a GPU: use attention=torch or attention=auto")
        from runner.attention.triton import TritonAttention
        return TritonAttention()
    from runner.attention.torch_ref import TorchAttention
    return TorchAttention()
