"""graph=auto: CUDA graphs on a GPU for an attention backend whose decode suits them, eager for
the torch reference (its decode gathers every row's context up to the captured length) and on
the CPU; graph=cuda and graph=eager as asked. Selection only: no GPU is touched."""
import pytest
import torch

from runner import build_runner, compose_config
from runner.attention.torch_ref import TorchAttention
from runner.attention.triton import TritonAttention
from runner.errors import RunnerError
from runner.graph import select
from runner.graph.select import select_graph

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


class CustomAttention:  # a user's backend that does not say
    pass


@pytest.mark.parametrize("name, device, attention, expected", [
    ("auto", CUDA, TritonAttention(), "CudaGraph"),
    ("auto", CUDA, TorchAttention(), "EagerGraph"),
    ("auto", CUDA, CustomAttention(), "CudaGraph"),
    ("auto", CPU, TritonAttention(), "EagerGraph"),
    ("cuda", CUDA, TorchAttention(), "CudaGraph"),
    ("eager", CUDA, TritonAttention(), "EagerGraph"),
])
def test_select_graph(name, device, attention, expected):
    assert type(select_graph(name, device=device, attention=attention)).__name__ == expected


def test_graph_cuda_on_cpu_names_the_fix():
    with pytest.raises(RunnerError, match="graph=cuda needs a GPU"):
        select_graph("cuda", device=CPU, attention=TorchAttention())


def test_build_runner_gives_the_selection_its_attention_backend(monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return select_graph(*args, **kwargs)

    monkeypatch.setattr(select, "select_graph", spy)  # conf/graph's _target_
    attention = TorchAttention()
    build_runner(compose_config(["model=tiny", "device=cpu", "graph=auto"]), attention=attention)
    assert seen["attention"] is attention
