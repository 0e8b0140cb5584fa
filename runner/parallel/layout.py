"""Rules a parallel layout must follow, checked before any rank starts (one line each, with the
rule and the numbers)."""
from __future__ import annotations

import torch

from runner.errors import RunnerError
from runner.parallel.plan import DCP_COMM_MODES

BACKENDS = ("auto", "nccl", "gloo")


def is_mla(hf_config) -> bool:
    """MLA configs carry num_key_value_heads = num_attention_heads, which says nothing about
    the single latent they cache; tell them apart by the latent rank."""
    return getattr(hf_config, "kv_lora_rank", None) is not None


def check_layout(p, hf_config, block_size: int, interleave: int, device: torch.device) -> None:
    tp, dcp = p.tp, p.dcp
    if dcp < 1 or tp < 1:
        raise RunnerError(f"parallel.tp={tp}, parallel.dcp={dcp}: both must be >= 1")
    if tp % dcp:
        raise RunnerError(f"parallel.dcp={dcp} must divide parallel.tp={tp} (DCP reuses TP ranks)")
    heads = hf_config.num_attention_heads
    if heads % tp:
        raise RunnerError(f"parallel.tp={tp} must divide the model's {heads} attention heads")
    if not is_mla(hf_config):
        kv = hf_config.num_key_value_heads
        if (tp > kv and tp % kv) or (tp <= kv and kv % tp):
            raise RunnerError(f"parallel.tp={tp} and the model's {kv} KV heads: one must divide "
                              f"the other")
        if dcp > 1 and (tp % kv or (tp // kv) % dcp):
            raise RunnerError(f"parallel.dcp={dcp} with {kv} KV heads needs tp % kv_heads == 0 and "
                              f"(tp / kv_heads) % dcp == 0 (tp={tp}): each DCP group must share "
                              f"one KV head")
    if interleave < 1 or block_size % interleave:
        raise RunnerError(f"block_table.interleave={interleave} must divide "
                          f"block_table.block_size={block_size}")
    if p.ep:
        experts = getattr(hf_config, "n_routed_experts", None)
        if not experts:
            raise RunnerError("parallel.ep=true needs a mixture-of-experts model")
        if experts % tp:
            raise RunnerError(f"parallel.ep=true: the {experts} experts are not divisible by "
                              f"tp={tp}")
    if p.dcp_comm not in DCP_COMM_MODES:
        raise RunnerError(f"parallel.dcp_comm={p.dcp_comm!r}: allowed {', '.join(DCP_COMM_MODES)}")
    if p.backend not in BACKENDS:
        raise RunnerError(f"parallel.backend={p.backend!r}: allowed {', '.join(BACKENDS)}")
    if device.type == "cuda":
        if p.backend == "gloo" and tp > 1:
            raise RunnerError("parallel.backend=gloo cannot run with CUDA tensors: "
                              "use nccl or auto")
        if tp > torch.cuda.device_count():
            raise RunnerError(f"parallel.tp={tp} ranks need {tp} GPUs; "
                              f"{torch.cuda.device_count()} visible")
    elif p.backend == "nccl" and tp > 1:
        raise RunnerError("parallel.backend=nccl needs GPUs: use gloo or auto on CPU")
