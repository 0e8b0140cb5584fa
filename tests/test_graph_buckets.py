"""CUDA-graph length buckets, host side: a batch replays the graph of the smallest captured
bound that holds its longest rank-local context; each backend names its bounds."""
from runner.attention.dcp import DCPAttention
from runner.attention.torch_ref import TorchAttention
from runner.attention.triton import TritonAttention
from runner.graph.cuda_graph import CudaGraph
from kernels.paged_decode import MAX_SHORT_CONTEXT


def test_the_smallest_bound_that_holds_the_batch():
    graph = CudaGraph()
    graph.length_bounds = [512, 4096]
    assert [graph.length_bound(n) for n in (1, 511, 512, 513, 4096)] == [512, 512, 512, 4096,
                                                                          4096]
    assert graph.length_bound(4097) is None  # no graph: the step runs eagerly


def test_backends_name_their_decode_length_buckets():
    assert TritonAttention.decode_length_buckets == (MAX_SHORT_CONTEXT,)
    assert TorchAttention.decode_length_buckets == ()
    assert DCPAttention(TritonAttention(), group=None).decode_length_buckets == (
        MAX_SHORT_CONTEXT,)
