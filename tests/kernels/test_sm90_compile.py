"""Kernels compiled for the H200 (sm_90) on this CPU machine: Triton's own LLVM and ptxas build
the cubin with no GPU. Catches what the interpreter lets through (loop-carried types, layouts,
register or shared-memory limits) before a GPU run; results are checked by the interpreter tests
and, on a GPU, by test_kernels_gpu.py. A subprocess: the other tests import Triton in
interpreter mode, which cannot compile."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = {  # kernel (module:name), argument types, constexprs (the launches' values)
    "greedy_summary": ("kernels.greedy_summary:_greedy_summary_kernel",
                       {"logits_ptr": "*fp32", "out_ptr": "*fp64", "vocab_size": "i32",
                        "row_stride": "i32"}, {"BLOCK": 4096}),
    "silu_mul": ("kernels.silu_mul:_silu_mul_kernel",
                 {"gate_up_ptr": "*bf16", "out_ptr": "*bf16", "intermediate_size": "i32",
                  "in_stride": "i32", "out_stride": "i32"}, {"BLOCK": 1024}),
}
COMPILE = """
import importlib, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
path, signature, constexprs = eval(sys.argv[1])
module, name = path.split(":")
kernel = getattr(importlib.import_module(module), name)
signature = {**signature, **{key: "constexpr" for key in constexprs}}
compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                          target=GPUTarget("cuda", 90, 32))
assert compiled.asm["cubin"]
"""


@pytest.mark.parametrize("name", CASES)
def test_compiles_for_sm90(name):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", COMPILE, repr(CASES[name])], env=env,
                            cwd=Path(__file__).resolve().parents[2], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
