"""Session setup: without CUDA, Triton kernels run under Triton's interpreter, which reads TRITON_INTERPRET
when Triton is imported, so it is set here, before any test module imports saelab or Triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
