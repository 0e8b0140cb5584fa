"""The memory-bandwidth floor of a decode step on this rank: the bytes it must read (weights,
the experts a batch touches, the KV cache) over the device's bandwidth."""
from __future__ import annotations

from runner.kv_cache import bytes_per_block

H200_COPY_BANDWIDTH = 4.3e12  # bytes/s, measured device-to-device copy (perf.md §6, §9)


def expected_experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a batch reads under uniform top-k routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_floor_ms(runner, batch: int, avg_context: float,
                    bandwidth: float = H200_COPY_BANDWIDTH) -> float:
    """Floor of one decode step (ms) of `batch` requests with `avg_context` tokens each."""
    cfg = runner.model.config
    expert_bytes, other_bytes = 0, 0
    for name, p in runner.model.named_parameters():
        if ".experts." in name:
            expert_bytes += p.numel() * p.element_size()
        else:
            other_bytes += p.numel() * p.element_size()
    if expert_bytes:
        experts = cfg.n_routed_experts
        touched = expected_experts_touched(experts, cfg.num_experts_per_tok, batch)
        expert_bytes *= touched / experts
    block_size = runner.block_table.block_size
    kv_per_token = bytes_per_block(runner.model.kv_cache_spec(), runner.model.num_layers,
                                   block_size, runner.kv_dtype) / block_size
    kv_bytes = batch * avg_context / runner.block_table.cp_size * kv_per_token
    return (other_bytes + expert_bytes + kv_bytes) / bandwidth * 1e3
