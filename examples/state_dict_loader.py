"""A user model loader: weights from a dict of tensors in memory (here the state_dict of a
transformers model), counting the tensors it hands to the model.

Run: python examples/state_dict_loader.py
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from runner import build_runner, compose_config
from runner.loaders.loader import HFModelLoader

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


class StateDictLoader(HFModelLoader):
    """The model described by `config` (a transformers config) with the weights of
    `state_dict` (checkpoint names, full unsharded tensors; each rank takes its shard)."""

    def __init__(self, config, state_dict: dict[str, torch.Tensor], dtype: str = "float32"):
        super().__init__(architecture=config.architectures[0], dtype=dtype)
        self.config = config
        self.state_dict = state_dict
        self.num_tensors_loaded = 0

    def hf_config(self):
        return self.config

    def load_weights(self, model, plan) -> None:
        model.load_weights(self._count(self.state_dict.items()))

    def _count(self, items):
        for name, tensor in items:
            self.num_tensors_loaded += 1
            yield name, tensor


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialized two-layer Llama (GQA: 8 query heads, 2 KV heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.2,
                         architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


def main(max_tokens: int = 8) -> tuple[list[list[int]], StateDictLoader, LlamaForCausalLM]:
    """Greedy tokens per prompt, the loader, and the transformers model it read."""
    hf_model = tiny_llama()
    loader = StateDictLoader(hf_model.config, hf_model.state_dict())
    runner = build_runner(compose_config(["device=cpu"]), model=loader)
    outputs = runner.generate(prompt_token_ids=PROMPTS, max_tokens=max_tokens)
    print(f"loaded {loader.num_tensors_loaded} tensors from memory")
    for o in outputs:
        print(f"{o.prompt_token_ids} -> {o.token_ids}")
    return [o.token_ids for o in outputs], loader, hf_model


if __name__ == "__main__":
    main()
