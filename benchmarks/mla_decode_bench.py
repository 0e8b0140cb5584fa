"""Paged MLA decode on one GPU: KV bandwidth of kernels/paged_decode.py at DeepSeek-V2-Lite
shapes (16 heads x 576, values = the first 512 dims, bf16), batch x context, for each page size
(`--block-sizes`, default 16, the runner's default, and 64; pages in random order).

    python3 benchmarks/mla_decode_bench.py [--tune] [--tune-contexts 4096 8192]
        [--block-sizes 16 64] [--cold] [--out results.json]

TB/s counts the latent cache read once: batch x context x 576 x 2 bytes. Each shape is first
checked against the torch reference on fresh random data. `--tune` also sweeps the kernel's
tiles (KV tokens per tile, warps, pipeline stages, programs per SM) at batch 128 and prints the
best per shape, for kernels/paged_decode.py's decode_config. Timings replay a CUDA graph of one
call, so below ~50 MB of KV (batch 128 x 512 tokens) the cache is read from L2; `--cold` flushes
the L2 before each call instead, as a decode step finds it (noisier).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
from triton.runtime.errors import OutOfResources

from kernels.paged_decode import DecodeConfig, paged_decode, paged_decode_ref

HEADS, HEAD_DIM, V_DIM = 16, 576, 512
SHAPES = [(1, 8192), (32, 8192), (128, 256), (128, 1024), (128, 2048), (128, 4096), (128, 8192),
          (256, 8192)]
TUNE_BATCH = 128
TUNE_BLOCK_N = (16, 32, 64)  # KV tokens per tile
TUNE_WARPS = (4, 8)
TUNE_STAGES = (1, 2, 3)
# sets the number of splits along the sequence, from the batch alone, as the runner does (its
# CUDA graphs fix the launch before the contexts are known)
TUNE_PROGRAMS_PER_SM = (1, 2, 3, 4)


def inputs(batch: int, context: int, block_size: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = batch * context // block_size
    cache = torch.randn(num_blocks, block_size, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                        generator=g)
    # the pages in random order; the permutation is drawn on the CPU (a run with a CUDA
    # randperm of 65536 stopped with an illegal address, cause not isolated)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    table = order.view(batch, -1).int().cuda()
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, cache, cache[..., :V_DIM], table, lens, HEAD_DIM ** -0.5


COLD = False  # --cold: the L2 flushed before every call


def time_us(args_, config: DecodeConfig | None = None) -> float:
    """Median of CUDA-graph replays (a plain launch loop would time the host's launch rate); with
    --cold, of single calls after an L2 flush (below ~50 MB of KV, replays read it from L2)."""
    fn = lambda: paged_decode(*args_, config=config)  # noqa: E731
    if COLD:
        return triton.testing.do_bench(fn, rep=50, return_mode="median") * 1e3
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def tune(batch: int, context: int, block_size: int) -> list[dict]:
    """Every candidate config at one shape, fastest first (configs that do not fit skipped)."""
    args_ = inputs(batch, context, block_size, seed=0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for block_n, warps, stages, per_sm in itertools.product(
            TUNE_BLOCK_N, TUNE_WARPS, TUNE_STAGES, TUNE_PROGRAMS_PER_SM):
        splits = max(1, min(per_sm * num_sms // batch, 32))
        config = DecodeConfig(block_n, splits, warps, stages)
        try:
            us = time_us(args_, config)
        except OutOfResources:
            continue
        results.append({"batch": batch, "context": context, "block_size": block_size,
                        "block_n": block_n,
                        "num_warps": warps, "num_stages": stages, "num_splits": splits, "us": us,
                        "tb_per_s": batch * context * HEAD_DIM * 2 / (us * 1e-6) / 1e12})
    del args_
    torch.cuda.empty_cache()
    return sorted(results, key=lambda r: r["us"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true", help="sweep the kernel's tiles too")
    parser.add_argument("--tune-contexts", type=int, nargs="+", default=[4096, 8192],
                        help=f"contexts of the sweep, at batch {TUNE_BATCH}")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64],
                        help="KV tokens per page")
    parser.add_argument("--cold", action="store_true",
                        help="flush the L2 before every timed call (as a decode step finds it)")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    global COLD
    COLD = args.cold
    print(f"{torch.cuda.get_device_name()}, MLA decode, {HEADS} heads x {HEAD_DIM}, bf16")
    print(f"{'page':>5} {'batch':>6} {'context':>8} {'us':>8} {'TB/s':>6} {'rel err':>8}")
    rows = []
    for block_size, (batch, context) in itertools.product(args.block_sizes, SHAPES):
        check = inputs(min(batch, 4), min(context, 1024), block_size, seed=1)
        out, lse = paged_decode(*check)
        ref_out, ref_lse = paged_decode_ref(*check)
        rel_err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        args_ = inputs(batch, context, block_size, seed=0)
        us = time_us(args_)
        tbps = batch * context * HEAD_DIM * 2 / (us * 1e-6) / 1e12
        rows.append({"block_size": block_size, "batch": batch, "context": context, "us": us,
                     "tb_per_s": tbps, "rel_err": rel_err})
        print(f"{block_size:>5} {batch:>6} {context:>8} {us:>8.1f} {tbps:>6.2f} "
              f"{rel_err:>8.1e}", flush=True)
        del args_
        torch.cuda.empty_cache()
    tuned = {}
    if args.tune:
        for block_size, context in itertools.product(args.block_sizes, args.tune_contexts):
            tuned[f"{TUNE_BATCH}x{context}/{block_size}"] = results = tune(TUNE_BATCH, context,
                                                                           block_size)
            print(f"\nbest configs at batch {TUNE_BATCH}, context {context}, page {block_size} "
                  f"(of {len(results)}):", flush=True)
            for r in results[:5]:
                print(f"  DecodeConfig(block_n={r['block_n']}, num_splits={r['num_splits']}, "
                      f"num_warps={r['num_warps']}, num_stages={r['num_stages']}): "
                      f"{r['us']:.1f} us, {r['tb_per_s']:.2f} TB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shapes": rows, "tuned": tuned}, f, indent=1)


if __name__ == "__main__":
    main()
