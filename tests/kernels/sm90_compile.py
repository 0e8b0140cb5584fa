"""Compile Triton kernels for the H200 (sm_90) without a GPU: `python tests/kernels/sm90_compile.py`
prints {case: error or ""} as JSON. Run with TRITON_INTERPRET=0 (test_sm90_compile.py does)."""
import importlib
import json
import sys
import traceback

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.paged_decode import gpu_decode_config

H200 = GPUTarget("cuda", 90, 32)
H200_MAX_SHARED = 232448  # bytes of shared memory one program may use (227 KiB)
FLOAT_SCALARS = {"eps", "scale_log2", "scaling"}
BF16, FP32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"

# case: (module:kernel, pointer types other than bf16, constexprs as launched at DeepSeek-V2-Lite
# decode shapes, launch options). Integer arguments are i32, FLOAT_SCALARS fp32.
CASES = {
    "greedy_chunks": ("kernels.greedy_summary:_chunk_summary_kernel",
                      {"best_ptr": FP32, "best_id_ptr": I32, "total_ptr": FP32},
                      {"CHUNK": 8192, "BLOCK": 4096, "PDL": True}, {}),
    "greedy_merge": ("kernels.greedy_summary:_merge_chunks_kernel",
                     {"best_ptr": FP32, "best_id_ptr": I32, "total_ptr": FP32, "out_ptr": "*fp64",
                      "ids_out_ptr": I64}, {"BLOCK_C": 16, "WRITE_IDS": True, "PDL": True}, {}),
    "silu_mul": ("kernels.silu_mul:_silu_mul_kernel", {}, {"BLOCK": 1024, "PDL": True}, {}),
    "rms_norm": ("kernels.rms_norm:_rms_norm_kernel", {},
                 {"HAS_RESIDUAL": True, "BLOCK": 2048, "PDL": True}, {}),
    "gqa_prologue": ("kernels.gqa_prologue:_gqa_prologue_kernel",
                     {"cos_ptr": FP32, "sin_ptr": FP32, "slots_ptr": I64},
                     {"WRITE_CACHE": True, "BLOCK_H": 16, "BLOCK_KV": 2, "BLOCK_R": 64,
                      "BLOCK_D": 128, "PDL": True}, {"num_warps": 4}),  # Qwen2.5-1.5B
    "mla_norm_rope": ("kernels.mla_norm_rope:_mla_norm_rope_kernel",
                      {"cos_ptr": FP32, "sin_ptr": FP32, "slots_ptr": I64},
                      {"WRITE_CACHE": True, "BLOCK_C": 512, "BLOCK_H": 16, "BLOCK_R": 32,
                       "PDL": True},
                      {"num_warps": 4}),
    **{f"moe_topk_e{block_e}": (
        "kernels.moe_router:_moe_topk_kernel",
        {"partial_ptr": FP32, "weights_ptr": FP32, "ids_ptr": I64, "counts_ptr": I32,
         "buckets_ptr": I32},
        {"NUM_SPLITS": 16, "TOP_K": 6, "NUM_GROUPS": 1, "TOPK_GROUP": 1, "RENORMALIZE": False,
         "BLOCK_TOP_K": 8, "BLOCK_T": 2, "BLOCK_E": block_e, "FILL_BUCKETS": True, "PDL": True},
        {"num_warps": 1})
       for block_e in (64, 256)},  # DeepSeek-V2-Lite, V2
    **{f"router_logits_e{block_e}": (
        "kernels.moe_router:_router_logits_kernel", {"partial_ptr": FP32, "counts_ptr": I32},
        {"BLOCK_T": 16, "BLOCK_E": block_e, "BLOCK_K": 8192 // block_e,
         "DOT_DTYPE": tl.bfloat16, "DOT_PRECISION": "tf32", "FILL_BUCKETS": True, "PDL": True},
        {"num_warps": 4})
       for block_e in (64, 256)},
    "moe_buckets": ("kernels.expert_buckets:_bucket_kernel",
                    {"ids_ptr": I64, "counts_ptr": I32, "buckets_ptr": I32}, {"BLOCK": 1024}, {}),
    **{f"moe_sum{'_norm' * norm}": (
        "kernels.fused_moe:_sum_choices_kernel", {"ids_ptr": I64},
        {"TOP_K": 6, "HAS_ADD": True, "ALL_LOCAL": norm, "NORM": norm,
         "BLOCK_H": 2048 if norm else 256,
         "PDL": True}, {"num_warps": 4}) for norm in (False, True)},
    **{f"paged_decode_mla_{name}": (
        "kernels.paged_decode:_paged_decode_kernel",
        {"block_table_ptr": I32, "seq_lens_ptr": I32, "lse_ptr": FP32},
        {"HEAD_DIM_K": 576, "HEAD_DIM_V": 512, "BLOCK_H": 16, "BLOCK_N": cfg.block_n,
         "BLOCK_D1": 512, "BLOCK_D2": 64, "BLOCK_DV": 512, "BLOCK_SIZE": 16, "PAGE_ALIGNED": True,
         "V_FROM_K": True,
         "DOT_DTYPE": tl.bfloat16, "DOT_PRECISION": "tf32", "PDL": True},
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
       for name, cfg in (("long", gpu_decode_config(128, 4096, 132)),
                         ("short", gpu_decode_config(128, 256, 132)))},  # the runner's tiles
}


# the kernels that let the next one start at once (kernels/dependent_launch.py)
RELEASE_NEXT_KERNEL = {"kernels.moe_router:_router_logits_kernel"}

MOE_GEMM_POINTERS = {
    "_gate_up_kernel": {"counts_ptr": I32, "buckets_ptr": I32},
    "_down_kernel": {"counts_ptr": I32, "buckets_ptr": I32, "weights_ptr": FP32},
}


def moe_gemm_cases() -> dict:
    """The fused MoE's two GEMM kernels with the tiles moe_config picks on the H200 (with
    TRITON_INTERPRET=0) for a 128-token decode batch and for the largest Triton prefill."""
    from kernels.fused_moe import moe_config
    from runner.models.layers.moe import MAX_TRITON_MOE_TOKENS
    cases = {}
    for num_tokens in (128, MAX_TRITON_MOE_TOKENS):
        config = moe_config(num_tokens, 64, 2048, 1408, torch.bfloat16)
        for kernel, tiles in (("_gate_up_kernel", config.gate_up), ("_down_kernel", config.down)):
            constexprs = {"BLOCK_M": config.block_m, "BLOCK_E": 64, "BLOCK_N": tiles.block_n,
                          "BLOCK_K": tiles.block_k, "EVEN_K": True, "DOT_DTYPE": tl.bfloat16,
                          "DOT_PRECISION": "tf32", "PDL": True}
            cases[f"moe{kernel[:-7]}_{num_tokens}"] = (
                f"kernels.fused_moe:{kernel}", MOE_GEMM_POINTERS[kernel], constexprs,
                {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    return cases


def all_cases() -> dict:
    return {**CASES, **moe_gemm_cases()}


def compile_case(path: str, pointers: dict, constexprs: dict, options: dict) -> None:
    module, name = path.split(":")
    kernel = getattr(importlib.import_module(module), name)
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, BF16)
                 if arg.endswith(("_ptr", "_desc")) else "fp32" if arg in FLOAT_SCALARS
                 else "i32" for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=H200,
                              options=options)
    assert compiled.asm["cubin"], "no cubin"
    if constexprs.get("PDL"):  # launched with launch_pdl: must wait for the previous kernel
        assert "griddepcontrol.wait" in compiled.asm["ptx"], "no griddepcontrol.wait"
        ptx = compiled.asm["ptx"]
        released = "griddepcontrol.launch_dependents" in ptx
        assert released == (path in RELEASE_NEXT_KERNEL), f"launch_dependents: {released}"
        if released:  # after its own wait: the next kernel cannot overtake the previous one
            assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents")
    shared = compiled.metadata.shared
    assert shared <= H200_MAX_SHARED, f"{shared} bytes of shared memory > {H200_MAX_SHARED}"


def main() -> None:
    errors = {}
    for case, spec in all_cases().items():
        try:
            compile_case(*spec)
            errors[case] = ""
        except Exception:  # reported per case by the test
            errors[case] = traceback.format_exc(limit=3)[-2000:]
    json.dump(errors, sys.stdout)


if __name__ == "__main__":
    main()
