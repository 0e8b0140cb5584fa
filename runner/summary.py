"""The run summary printed once at start (rank 0): model, layout, KV capacity."""
from __future__ import annotations

from runner.console import print_table


def print_summary(runner) -> None:
    plan = runner.plan.describe()
    bt = runner.block_table
    cfg = runner.model.config
    rows = [
        ["model", f"{(cfg.architectures or ['?'])[0]}, {runner.model.num_layers} layers, "
                  f"weights {runner.weights_source}"],
        ["device / dtype", f"{runner.device} / {str(runner.kv_dtype).removeprefix('torch.')}"],
        ["layout", f"tp={plan['tp']} dcp={plan['dcp']} interleave={bt.interleave} "
                   f"ep={str(plan['ep']).lower()} comm={plan['comm']}"],
        ["attention / graph", f"{_attention_name(runner.attention)} / {runner.graph.describe()}"],
        ["KV cache", f"{runner.num_blocks} blocks x {bt.block_size} tokens per rank; capacity "
                     f"{runner.kv_capacity_tokens} tokens (x{bt.cp_size} with DCP)"],
        ["max_model_len", str(runner.max_model_len)],
    ]
    print_table("dcp-runner", ["", ""], rows, show_header=False)


def _attention_name(attention) -> str:
    inner = getattr(attention, "backend", None)  # the DCP wrapper names the backend it wraps
    if inner is None:
        return type(attention).__name__
    return f"{type(inner).__name__} inside DCP ({attention.comm})"
