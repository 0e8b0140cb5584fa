"""The prefill warm-up a GPU runner does at startup (every power-of-two token count up to
max_num_batched_tokens, so that Triton compiles each size class before the first request) stores
nothing in the KV cache and changes no output; run here on CPU, where the runner skips it."""
import pytest
import torch

from runner import build_runner, compose_config

PROMPTS = [list(range(1, n + 1)) for n in (3, 17, 40)]


def _runner(model: str):
    return build_runner(compose_config([f"model={model}", "model.dtype=float32", "device=cpu",
                                        "scheduler.max_num_seqs=4",
                                        "model.max_model_len=128",
                                        "scheduler.max_num_batched_tokens=200"]))


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_warm_up_stores_nothing_and_changes_no_output(model):
    plain, warmed = _runner(model), _runner(model)
    for layer in warmed.kv_caches:
        for cache in layer:
            if cache is not None:
                cache.fill_(0.5)
    warmed.warm_up_prefill(200)  # 1, 2, 4, ..., 128, 200 tokens (positions wrap at 128)
    for layer in warmed.kv_caches:
        for cache in layer:
            if cache is not None:
                assert torch.all(cache == 0.5)
    assert not warmed.requests and not warmed.has_unfinished()
    assert ([o.token_ids for o in warmed.generate(PROMPTS, 6)]
            == [o.token_ids for o in plain.generate(PROMPTS, 6)])
