"""A user attention backend: the torch reference backend, counting its calls.

Run: python examples/logging_attention.py
"""
from __future__ import annotations

from collections import Counter

from runner import build_runner, compose_config
from runner.attention.torch_ref import TorchAttention

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


class CountingAttention(TorchAttention):
    """Attends like TorchAttention; counts KV writes, prefills and decodes (one per layer)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        self.calls["write_kv"] += 1
        super().write_kv(k_cache, v_cache, slot_mapping, key, value)

    def prefill(self, q, k, v, meta, scale):
        self.calls["prefill"] += 1
        return super().prefill(q, k, v, meta, scale)

    def decode(self, q, k_cache, v_cache, meta, scale):
        self.calls["decode"] += 1
        return super().decode(q, k_cache, v_cache, meta, scale)


def main(max_tokens: int = 8) -> tuple[list[list[int]], Counter[str]]:
    """Greedy tokens per prompt and the backend's call counts."""
    cfg = compose_config(["model=tiny", "device=cpu"])
    attention = CountingAttention()
    runner = build_runner(cfg, attention=attention)  # the object replaces conf/attention
    outputs = runner.generate(prompt_token_ids=PROMPTS, max_tokens=max_tokens)
    print(f"attention calls: {dict(attention.calls)}")
    for o in outputs:
        print(f"{o.prompt_token_ids} -> {o.token_ids}")
    return [o.token_ids for o in outputs], attention.calls


if __name__ == "__main__":
    main()
