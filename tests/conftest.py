"""Test set-up. Triton's interpreter must be switched on before any kernel is decorated, so this runs
first; on a CUDA machine the same tests run the compiled kernel natively."""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall badly on a shared CPU
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny test models gain nothing from a second thread
