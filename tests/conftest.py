# Triton kernels run under its CPU interpreter in tests; this must happen before triton is imported.
# The GPU run sets TRITON_INTERPRET=0 itself (`TRITON_INTERPRET=0 pytest -m gpu`) to compile them.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
