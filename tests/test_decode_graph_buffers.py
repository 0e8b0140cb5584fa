"""What decode graphs share, checked on the host: a batch replays the graph of the smallest
captured length bound that holds its longest rank-local context (each backend names its bounds),
and every decode step writes its logits into one persistent buffer, not an output per graph."""
from runner import build_runner, compose_config
from runner.request import SamplingParams
from runner.scheduler import ScheduledBatch
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


def test_backends_name_their_decode_length_buckets_and_fused_kv_write():
    assert TritonAttention.decode_length_buckets == (MAX_SHORT_CONTEXT,)
    assert TorchAttention.decode_length_buckets == ()
    assert DCPAttention(TritonAttention(), group=None).decode_length_buckets == (
        MAX_SHORT_CONTEXT,)
    # the DCP wrapper passes the opt-in through (the slot mapping it writes at is rank-local)
    assert DCPAttention(TritonAttention(), group=None).fused_kv_write is True
    assert DCPAttention(TorchAttention(), group=None).fused_kv_write is False
    assert DCPAttention(TritonAttention(), group=None).decode_in_graphs is True
    assert DCPAttention(TorchAttention(), group=None).decode_in_graphs is False

    class LoggingTriton(TritonAttention):  # its write_kv must see every write
        def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
            super().write_kv(k_cache, v_cache, slot_mapping, key, value)

    assert LoggingTriton().fused_kv_write is False


def test_decode_steps_write_their_logits_into_one_buffer():
    runner = build_runner(compose_config(["model=tiny", "device=cpu", "scheduler.max_num_seqs=4",
                                          "scheduler.async_scheduling=false"]))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    for prompt in prompts:
        runner.add_request(prompt, SamplingParams(max_tokens=4))
    runner.step()  # prefill
    buffer = runner.decode_buffers.logits  # [max_num_seqs, V]
    for num_reqs in (3, 1):
        requests = runner.scheduler.running[:num_reqs]
        batch = ScheduledBatch(is_prefill=False, requests=requests)
        logits = runner.run_forward(batch).logits  # [R, V]
        assert logits.shape == (num_reqs, runner.vocab_size)
        assert logits.data_ptr() == buffer.data_ptr()
        max_len = runner.block_table.max_local_len(max(r.num_tokens for r in requests))
        expected = runner.model.compute_logits(runner._forward(
            runner.decode_buffers.inputs(num_reqs, max_len)))  # the same step, out of place
        assert logits.equal(expected)
