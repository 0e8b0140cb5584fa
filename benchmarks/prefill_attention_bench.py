"""Prefill attention on one GPU: torch SDPA on one request as the Triton backend runs it, per
SDPA kernel, at DeepSeek-V2-Lite MLA shapes (16 heads, q/k 192 = 128 + 64 rope, v 128) and a GQA
shape (Qwen2.5-1.5B: 12 query / 2 KV heads x 128), bf16.

    python3 benchmarks/prefill_attention_bench.py [--lengths 512 2048 4096 8192] [--out r.json]

Variants: `mask` (a dense causal mask, the backend's path up to 4096 tokens per step), `causal`
(is_causal, its per-request path above that), and for MLA `causal, v padded` (V zero-padded to
the q/k width: FlashAttention takes only equal head dims; the padded output columns are zero and
dropped), to decide how the backend should call SDPA. TFLOP/s counts the causal half of
2 x H x T^2 x (Dqk + Dv).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

SHAPES = {"mla": (16, 16, 192, 128), "gqa": (12, 2, 128, 128)}  # heads, kv heads, Dqk, Dv
BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _inputs(length: int, num_heads: int, num_kv_heads: int, qk_dim: int, v_dim: int):
    """q [1, H, T, Dqk], k [1, Hkv, T, Dqk], v [1, Hkv, T, Dv] bf16 (the backend's transposes)."""
    g = torch.Generator(device="cuda").manual_seed(length)
    def make(heads, dim):
        return torch.randn(1, heads, length, dim, device="cuda", generator=g,
                           dtype=torch.bfloat16)
    return make(num_heads, qk_dim), make(num_kv_heads, qk_dim), make(num_kv_heads, v_dim)


def _time_us(q, k, v, backend: SDPBackend | None, variant: str) -> float | None:
    """Median us of one SDPA call (None: that kernel refuses these inputs)."""
    v_dim, length = v.shape[-1], q.shape[2]
    if variant == "causal, v padded":
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    mask = (torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            if variant == "mask" else None)
    gqa = q.shape[1] != k.shape[1]

    def attend():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=gqa)
        return out[..., :v_dim]
    try:
        if backend is None:
            return do_bench(attend, return_mode="median") * 1e3
        with sdpa_kernel(backend):
            return do_bench(attend, return_mode="median") * 1e3
    except RuntimeError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}, causal SDPA per request, bf16, us (TFLOP/s)")
    print(f"{'shape':>5} {'T':>6} {'variant':>16} " + " ".join(f"{b:>16}" for b in BACKENDS))
    for shape, (num_heads, num_kv_heads, qk_dim, v_dim) in SHAPES.items():
        for length in args.lengths:
            q, k, v = _inputs(length, num_heads, num_kv_heads, qk_dim, v_dim)
            flops = 2 * num_heads * length * length * (qk_dim + v_dim) / 2
            variants = ["mask", "causal"] + (["causal, v padded"] if qk_dim != v_dim else [])
            for variant in variants:
                times = {name: _time_us(q, k, v, backend, variant)
                         for name, backend in BACKENDS.items()}
                rows.append({"shape": shape, "length": length, "variant": variant, "us": times})
                cells = [f"{'-':>16}" if us is None else
                         f"{us:>8.1f} ({flops / us * 1e-6:>5.0f})" for us in times.values()]
                print(f"{shape:>5} {length:>6} {variant:>16} " + " ".join(cells), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
