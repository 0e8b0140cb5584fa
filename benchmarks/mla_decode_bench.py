"""Paged MLA decode on one GPU: KV bandwidth of kernels/paged_decode.py at DeepSeek-V2-Lite
shapes (16 heads x 576, values = the first 512 dims, block 64, bf16), batch x context.

    python3 benchmarks/mla_decode_bench.py [--out results.json]

TB/s counts the latent cache read once: batch x context x 576 x 2 bytes. Each shape is first
checked against the torch reference on fresh random data.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from kernels.paged_decode import paged_decode, paged_decode_ref

HEADS, HEAD_DIM, V_DIM, BLOCK = 16, 576, 512, 64
SHAPES = [(1, 8192), (32, 8192), (128, 1024), (128, 2048), (128, 4096), (128, 8192), (256, 8192)]


def inputs(batch: int, context: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = batch * context // BLOCK
    cache = torch.randn(num_blocks, BLOCK, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                        generator=g)
    table = torch.randperm(num_blocks, device="cuda", generator=g).view(batch, -1).int()
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, cache, cache[..., :V_DIM], table, lens, HEAD_DIM ** -0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    rows = []
    for batch, context in SHAPES:
        check = inputs(min(batch, 4), min(context, 1024), seed=1)
        out, lse = paged_decode(*check)
        ref_out, ref_lse = paged_decode_ref(*check)
        rel_err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        args_ = inputs(batch, context, seed=0)
        # graph replays: a plain launch loop would time the host's launch rate at small shapes
        ms = triton.testing.do_bench_cudagraph(lambda: paged_decode(*args_), rep=50,
                                               return_mode="median")
        tbps = batch * context * HEAD_DIM * 2 / (ms * 1e-3) / 1e12
        rows.append({"batch": batch, "context": context, "us": ms * 1e3, "tb_per_s": tbps,
                     "rel_err": rel_err})
        del args_
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, MLA decode, {HEADS} heads x {HEAD_DIM}, bf16")
    print(f"{'batch':>6} {'context':>8} {'us':>8} {'TB/s':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>8} {r['us']:>8.1f} {r['tb_per_s']:>6.2f} "
              f"{r['rel_err']:>8.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
