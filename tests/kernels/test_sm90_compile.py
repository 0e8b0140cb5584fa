"""The Triton kernels compiled for the H200 (sm_90) on this CPU machine, by Triton's own LLVM and
ptxas (tests/kernels/sm90_compile.py holds the cases: DeepSeek-V2-Lite decode launches). Catches
what the interpreter lets through (loop-carried types, layouts, shared memory) before a GPU run;
results are checked by the interpreter tests and, on a GPU, by test_kernels_gpu.py. One
subprocess: the other tests import Triton in interpreter mode, which cannot compile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm90_compile import all_cases

SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.fixture(scope="module")
def compile_errors() -> dict[str, str]:
    root = SCRIPT.parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", all_cases())
def test_compiles_for_sm90(case, compile_errors):
    assert compile_errors[case] == ""
