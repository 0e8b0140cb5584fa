"""Decode MoE layer on one GPU: the Triton fused MoE vs the torch fused_moe (torch._grouped_mm),
bf16, DeepSeek-V2-Lite shapes, seeded uniform top-K routing, timed as CUDA graph replays; TB/s
counts the expert weights touched. `--tune` sweeps tiles per batch for kernels/fused_moe.py.
The Triton times include the pairs' bucketing (a memset and one small kernel), which a decode
step does inside the router's top-k instead.

    python benchmarks/moe_bench.py [--tune] [--out results.json]
(the torch path imports runner/, which needs hydra-core: carry the .whl wheels on the GPU image)
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.fused_moe import GemmTiles, MoeConfig, fused_moe_triton, moe_config  # noqa: E402
from runner.models.layers.moe import fused_moe  # noqa: E402

NUM_LAYERS = 4  # distinct weights per timed call, so the L2 cache cannot hold a layer's experts
TUNE_BLOCK_K = (64, 128, 256)
TUNE_WARPS = (4,)
TUNE_STAGES = (3, 4)
TUNE_BLOCK_N = {"gate_up": (16, 32, 64, 128), "down": (32, 64, 128, 256)}
COMPILE_WORKERS = 8


def make_inputs(num_tokens: int, intermediate_size: int, args: argparse.Namespace,
                num_layers: int = NUM_LAYERS):
    """x [T, H] bf16, uniform random top-K routing ([T, K] ids and weights), and num_layers
    weight pairs (w13 [E, 2I, H], w2 [E, H, I]) bf16."""
    gen = torch.Generator(device="cuda").manual_seed(args.seed + num_tokens)
    hidden, num_experts = args.hidden_size, args.num_experts
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=gen)
    topk_weights, topk_ids = scores.topk(args.top_k, dim=-1)  # K distinct experts per token
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    weights = [((torch.randn(num_experts, 2 * intermediate_size, hidden, device="cuda",
                             generator=gen) * hidden ** -0.5).to(torch.bfloat16),
                (torch.randn(num_experts, hidden, intermediate_size, device="cuda",
                             generator=gen) * intermediate_size ** -0.5).to(torch.bfloat16))
               for _ in range(num_layers)]
    return x, topk_ids, topk_weights, weights


def time_layer_us(moe, inputs, rep_ms: int = 50, **kwargs) -> float:
    """Median time of one layer: the layers run back to back in a CUDA graph, replayed."""
    x, topk_ids, topk_weights, weights = inputs

    def run_layers():
        for w13, w2 in weights:
            moe(x, w13, w2, topk_ids, topk_weights, **kwargs)
    return do_bench_cudagraph(run_layers, rep=rep_ms, return_mode="median") * 1e3 / len(weights)


def tune_candidates(base: MoeConfig, num_tokens: int) -> dict[int, dict[str, list[GemmTiles]]]:
    """Per BLOCK_M (16, and larger ones when experts get several rows), the tiles to try for
    each GEMM."""
    block_ms = [m for m in (16, 32, 64) if m == 16 or m <= num_tokens // 4]
    return {block_m: {gemm: [GemmTiles(*tiles) for tiles in itertools.product(
        block_ns, TUNE_BLOCK_K, TUNE_WARPS, TUNE_STAGES)] for gemm, block_ns in
        TUNE_BLOCK_N.items()} for block_m in block_ms}


def _compile(num_tokens: int, intermediate_size: int, args: argparse.Namespace,
             configs: list[MoeConfig]) -> None:
    """Worker: run each config once, so Triton's disk cache holds its kernels."""
    inputs = make_inputs(num_tokens, intermediate_size, args, num_layers=1)
    x, topk_ids, topk_weights, ((w13, w2),) = inputs
    for config in configs:
        try:
            fused_moe_triton(x, w13, w2, topk_ids, topk_weights, config=config)
        except OutOfResources:
            pass
    torch.cuda.synchronize()


def precompile(num_tokens: int, intermediate_size: int, args: argparse.Namespace,
               base: MoeConfig) -> None:
    """Compile every candidate kernel in parallel processes (a GEMM's kernel depends only on
    BLOCK_M and its own tiles)."""
    configs = [MoeConfig(block_m, tiles, base.down) if gemm == "gate_up" else
               MoeConfig(block_m, base.gate_up, tiles)
               for block_m, grids in tune_candidates(base, num_tokens).items()
               for gemm, grid in grids.items() for tiles in grid]
    with ProcessPoolExecutor(COMPILE_WORKERS, mp_context=mp.get_context("spawn")) as pool:
        jobs = [pool.submit(_compile, num_tokens, intermediate_size, args,
                            configs[i::COMPILE_WORKERS]) for i in range(COMPILE_WORKERS)]
        for job in jobs:
            job.result()


def fastest(inputs, configs: list[MoeConfig]) -> tuple[MoeConfig, float]:
    """The fastest config and its time; a tile that does not fit (shared memory) is skipped."""
    best = (configs[0], float("inf"))
    for config in configs:
        try:
            us = time_layer_us(fused_moe_triton, inputs, rep_ms=20, config=config)
        except OutOfResources:
            continue
        best = min(best, (config, us), key=lambda item: item[1])
    return best


def tune(inputs, base: MoeConfig, num_tokens: int) -> tuple[MoeConfig, float]:
    """Per BLOCK_M, the best gate/up tiles (down at base), then the best down tiles with them;
    the fastest of those and base."""
    best = (base, time_layer_us(fused_moe_triton, inputs, rep_ms=20, config=base))
    for block_m, grids in tune_candidates(base, num_tokens).items():
        gate_up = fastest(inputs, [MoeConfig(block_m, tiles, base.down)
                                   for tiles in grids["gate_up"]])[0].gate_up
        candidate = fastest(inputs, [MoeConfig(block_m, gate_up, tiles)
                                     for tiles in grids["down"]])
        print(f"  tuning T={num_tokens}: BLOCK_M {block_m}: {candidate[1]:.1f} us with "
              f"{candidate[0]}", flush=True)
        best = min(best, candidate, key=lambda item: item[1])
    return best


def measure(num_tokens: int, intermediate_size: int, args: argparse.Namespace) -> dict:
    inputs = make_inputs(num_tokens, intermediate_size, args)
    x, topk_ids, topk_weights, weights = inputs
    want = fused_moe(x, *weights[0], topk_ids, topk_weights).float()
    got = fused_moe_triton(x, *weights[0], topk_ids, topk_weights).float()
    max_rel_err = ((got - want).abs().max() / want.abs().max()).item()
    experts_touched = topk_ids.unique().numel()
    weight_bytes = experts_touched * 3 * args.hidden_size * intermediate_size * 2
    triton_us = time_layer_us(fused_moe_triton, inputs)
    torch_us = time_layer_us(fused_moe, inputs)
    config = moe_config(num_tokens, args.num_experts, args.hidden_size, intermediate_size,
                        torch.bfloat16)
    row = {"batch": num_tokens, "intermediate_size": intermediate_size,
           "experts_touched": experts_touched, "weight_bytes": weight_bytes,
           "triton_us": triton_us, "torch_us": torch_us,
           "triton_tbps": weight_bytes / triton_us * 1e-6,
           "torch_tbps": weight_bytes / torch_us * 1e-6,
           "max_rel_err": max_rel_err, "config": asdict(config)}
    if args.tune:
        precompile(num_tokens, intermediate_size, args, config)
        best, best_us = tune(inputs, config, num_tokens)
        row.update(tuned_us=best_us, tuned_tbps=weight_bytes / best_us * 1e-6,
                   tuned_config=asdict(best))
    return row


MAX_REL_ERR = 2e-2  # bf16 results of the two paths differ by their roundings only


def table_line(row: dict | None, tuned: bool) -> str:
    """One row of the results table, or its header for None."""
    if row is None:
        return (f"{'I':>5} {'batch':>5} {'experts':>7} {'triton us':>9} {'TB/s':>5} "
                f"{'torch us':>8} {'TB/s':>5} {'speedup':>7} {'rel err':>8}"
                + ("  tuned us  TB/s" if tuned else ""))
    line = (f"{row['intermediate_size']:>5} {row['batch']:>5} {row['experts_touched']:>7} "
            f"{row['triton_us']:>9.1f} {row['triton_tbps']:>5.2f} {row['torch_us']:>8.1f} "
            f"{row['torch_tbps']:>5.2f} {row['torch_us'] / row['triton_us']:>6.2f}x "
            f"{row['max_rel_err']:>8.1e}" + ("!" if row["max_rel_err"] > MAX_REL_ERR else ""))
    if tuned:
        line += f"  {row['tuned_us']:>8.1f} {row['tuned_tbps']:>5.2f}"
    return line


def print_tuned_configs(rows: list[dict]) -> None:
    """The best configs as entries of kernels/fused_moe.py's _H200_CONFIGS, per I."""
    for intermediate_size in dict.fromkeys(r["intermediate_size"] for r in rows):
        print(f"\nbest configs for I={intermediate_size} (entries of _H200_CONFIGS):")
        for r in rows:
            if r["intermediate_size"] == intermediate_size:
                c = r["tuned_config"]
                tiles = ", ".join(f"GemmTiles({t['block_n']}, {t['block_k']}, {t['num_warps']}, "
                                  f"{t['num_stages']})" for t in (c["gate_up"], c["down"]))
                print(f"    ({r['batch']}, MoeConfig({c['block_m']}, {tiles})),")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--intermediate-sizes", type=int, nargs="+", default=[1408, 704])
    parser.add_argument("--num-experts", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", action="store_true", help="sweep tiles, print the best")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("moe_bench.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, E={args.num_experts}, H={args.hidden_size}, "
          f"top-{args.top_k}, bf16, us per layer (CUDA graph replay, median), TB/s of the "
          f"expert weights touched", flush=True)
    print(table_line(None, args.tune), flush=True)
    rows = []
    for intermediate_size in args.intermediate_sizes:
        for num_tokens in args.batches:
            rows.append(measure(num_tokens, intermediate_size, args))
            print(table_line(rows[-1], args.tune), flush=True)
    if args.tune:
        print_tuned_configs(rows)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                        "settings": settings, "rows": rows}, indent=1))
    if any(r["max_rel_err"] > MAX_REL_ERR for r in rows):
        sys.exit(f"max rel err above {MAX_REL_ERR} (marked !)")


if __name__ == "__main__":
    main()
