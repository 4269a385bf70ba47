"""Session setup: without CUDA, Triton kernels run under Triton's interpreter, which reads TRITON_INTERPRET
when Triton is imported, so it is set here, before any test module imports saelab or Triton. sparsify
decodes with its own Triton kernel whenever Triton imports (it reads SPARSIFY_DISABLE_TRITON at import):
without CUDA it gets its eager decoder, as on a machine without Triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

# Under pytest-xdist (`-n 2`) each worker trains on one thread, and so do the processes its tests start: two
# workers then share two cores instead of four threads contending for them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread inside the test (also without xdist): small matrices run fastest so, and on a loaded
    2-core machine two threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
