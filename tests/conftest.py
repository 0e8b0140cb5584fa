# Triton kernels run under its CPU interpreter in tests; this must happen before triton is imported.
# The GPU run sets TRITON_INTERPRET=0 itself (`TRITON_INTERPRET=0 pytest -m gpu`) to compile them.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the suite's tensors are tiny, and CI has 2 cores (threads only contend).
import torch  # noqa: E402

torch.set_num_threads(1)
