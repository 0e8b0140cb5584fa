"""GPU-only checks of the fast path (run with `TRITON_INTERPRET=0 pytest -m gpu` on a GPU):
CUDA-graph replay equals eager for every captured size, and Triton attention + graphs gives the
torch backend's greedy tokens on a float32 model."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

from kernels.paged_decode import MAX_SHORT_CONTEXT

SIZES = [1, 2, 4, 8]


def _runner(*overrides):
    from runner import build_runner, compose_config
    # a fixed cache: a second runner in the process must not size by the first one's free memory
    return build_runner(compose_config(["model.dtype=float32", "device=cuda",
                                        "scheduler.max_num_seqs=8", "block_table.num_blocks=512",
                                        *overrides]))


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_graph_replay_equals_eager_for_every_size(model):
    from runner.request import SamplingParams
    runner = _runner(f"model={model}", "attention=triton", "graph=cuda",
                     f"graph.batch_sizes={SIZES}")
    for length in (3, 17, 40, 5, 64, 9, 33, 2):
        runner.add_request(list(range(1, length + 1)), SamplingParams(max_tokens=8))
    runner.step()  # prefill of all eight
    longest = runner.decode_buffers.max_local_seq_len
    assert runner.graph.length_bounds == [MAX_SHORT_CONTEXT, longest]  # Triton's short bucket
    outputs = [output for _, output in runner.graph.graphs.values()]
    assert {o.logits.data_ptr() for o in outputs} == {runner.decode_buffers.logits.data_ptr()}
    for num_reqs in (1, 3, 4, 7, 8):
        requests = runner.scheduler.running[:num_reqs]
        padded = runner.graph.padded_size(num_reqs)
        assert padded in SIZES and padded >= num_reqs
        runner.decode_buffers.stage(requests, padded)
        for max_len in (max(r.num_tokens for r in requests), longest):  # each length bound
            inputs = runner.decode_buffers.inputs(padded, max_len)
            num_replayed = runner.graph.num_replayed
            replayed = runner.graph.replay(inputs).logits[:num_reqs].clone()
            assert runner.graph.num_replayed == num_replayed + 1
            eager = runner._decode_step(inputs).logits[:num_reqs]
            torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    runner.shutdown()


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_triton_with_graphs_gives_torch_greedy_tokens(model):
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [list(range(1, n + 1)) for n in (1, 7, 20, 45)]
    reference = _runner(f"model={model}", "attention=torch", "graph=eager")
    expected = [o.token_ids for o in reference.generate(prompts, max_tokens=16)]
    fast = _runner(f"model={model}", "attention=triton", "graph=cuda")
    assert [o.token_ids for o in fast.generate(prompts, max_tokens=16)] == expected
    assert fast.graph.num_replayed > 0
    fast.shutdown()


@pytest.mark.parametrize("num_prompts, prompt_len, max_tokens", [
    (3, 500, 24),  # crosses the 512-token graph bound mid-generation (async feeding between)
    (96, 20, 8),   # a full batch: the short-context decode tiles (one split) inside the graph
])
def test_triton_graphs_across_length_bounds_give_torch_greedy_tokens(num_prompts, prompt_len,
                                                                       max_tokens):
    from runner import build_runner, compose_config
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [[(7 * i + j) % 500 + 1 for j in range(prompt_len + i % 7)]
               for i in range(num_prompts)]
    base = ["model=tiny", "model.dtype=float32", "device=cuda", "block_table.num_blocks=1024",
            f"scheduler.max_num_seqs={num_prompts}"]
    reference = build_runner(compose_config([*base, "attention=torch", "graph=eager"]))
    expected = [o.token_ids for o in reference.generate(prompts, max_tokens=max_tokens)]
    reference.shutdown()
    fast = build_runner(compose_config([*base, "attention=triton", "graph=cuda"]))
    assert [o.token_ids for o in fast.generate(prompts, max_tokens=max_tokens)] == expected
    assert fast.graph.num_replayed > 0 and fast.graph.num_eager == 0
    fast.shutdown()


def test_graph_auto_runs_the_torch_backend_eagerly():
    runner = _runner("model=tiny", "attention=torch", "graph=auto")
    assert type(runner.graph).__name__ == "EagerGraph"
    assert len(runner.generate([[1, 2, 3]], max_tokens=4)[0].token_ids) == 4
    runner.shutdown()
