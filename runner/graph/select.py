"""`graph=auto|eager|cuda`: pick the graph capturer for the device and attention backend."""
from __future__ import annotations

import torch

from runner.errors import RunnerError

NAMES = ("auto", "eager", "cuda")


def select_graph(name: str, batch_sizes: list[int] | None = None,
                 device: torch.device | None = None, attention=None):
    """auto: CUDA graphs on a GPU when the attention backend's decode suits them
    (AttentionBackend.decode_in_graphs), else eager."""
    if name not in NAMES:
        raise RunnerError(f"graph.name={name!r}: allowed {', '.join(NAMES)}")
    on_gpu = device is not None and device.type == "cuda"
    suits = getattr(attention, "decode_in_graphs", True)
    if name == "cuda" or (name == "auto" and on_gpu and suits):
        if not on_gpu:
            raise RunnerError("graph=cuda needs a GPU: use graph=eager or graph=auto")
        from runner.graph.cuda_graph import CudaGraph
        return CudaGraph(batch_sizes or None)
    from runner.graph.eager import EagerGraph
    return EagerGraph()
