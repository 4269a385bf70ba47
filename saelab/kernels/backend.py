"""Which implementation the sparse kernels use, decided in one place per device.

- Sparse rows (decode, its backward, the encoder gradient through the kept codes): `torch` (fused
  embedding bags, the CPU path) or `triton` (`saelab.kernels.triton_rows`, balanced under skewed hit
  patterns). Default: triton on CUDA when Triton imports, torch otherwise.
- Encoder-weight gradient: `sparse` (a scatter of the B * K slots) or `dense` (one [d, B] x [B, n] GEMM
  after a sparse-to-dense scatter of the code gradients). Default: sparse.
- Gathered rows on the Triton path: `float32` (the master weights' dtype, as measured so far) or `autocast`
  (under autocast, the rows the kernels gather, decoder rows and the [B, d] gradient and input rows, are
  read in the autocast dtype: half the bytes of the gathers that dominate these kernels; products still
  accumulate in float32, as autocast's GEMMs do). Default: float32 until a GPU measures the gain.
- AuxK: `dense` (a GEMM over the gathered dead sub-dictionary, `saelab.kernels.auxk`) or `sparse` (the
  top aux_k dead codes ride along with the TopK codes through the sparse kernels). Default: dense on CUDA;
  on CPU dense while the dead list is at most AUXK_DENSE_MAX_RATIO * aux_k long (the GEMM costs
  O(B * n_dead * d), the sparse path O(B * aux_k * d)).

Overrides, for tests and measurements: the environment variables SAELAB_SPARSE_BACKEND (auto, torch,
triton), SAELAB_ENCODER_GRAD (auto, sparse, dense), SAELAB_SPARSE_ROWS (auto, float32, autocast),
SAELAB_AUXK (auto, sparse, dense), or the `override`
context manager, which wins over the environment. Triton on CPU runs only under its interpreter
(TRITON_INTERPRET=1, set before Triton is imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

#: On CPU, AuxK uses the dense gathered product while n_dead <= this many times aux_k. Measured on a 2-core CPU
#: (scripts/bench_auxk.py, 256/4096/32/1024): at 3.2 x aux_k the dense product still cost a little less than
#: the sparse codes (1.43x vs 1.51x the idle step); its cost grows with n_dead, the sparse codes stay aux_k a row.
AUXK_DENSE_MAX_RATIO = 4.0
CHOICES = {
    "SAELAB_SPARSE_BACKEND": ("auto", "torch", "triton"),
    "SAELAB_ENCODER_GRAD": ("auto", "sparse", "dense"),
    "SAELAB_SPARSE_ROWS": ("auto", "float32", "autocast"),
    "SAELAB_AUXK": ("auto", "sparse", "dense"),
}
_overrides: dict[str, str] = {}


@functools.cache
def triton_available() -> bool:
    """Triton is importable (its package is present; importing it is left to first use)."""
    return importlib.util.find_spec("triton") is not None


def triton_kernels() -> ModuleType:
    """`saelab.kernels.triton_rows`, imported on first use (importing Triton costs time on CPU-only runs)."""
    return importlib.import_module("saelab.kernels.triton_rows")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _choice(variable: str) -> str:
    value = _overrides.get(variable) or os.environ.get(variable, "auto")
    if value not in CHOICES[variable]:
        raise ValueError(f"{variable}={value!r} must be one of {', '.join(CHOICES[variable])}.")
    return value


def sparse_backend(device: torch.device) -> str:
    """'triton' or 'torch' for sparse rows on `device`."""
    choice = _choice("SAELAB_SPARSE_BACKEND")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("SAELAB_SPARSE_BACKEND=triton but Triton is not installed: pip install triton.")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"SAELAB_SPARSE_BACKEND=triton on {device.type} needs TRITON_INTERPRET=1 (set before import)."
            )
    return choice


def encoder_grad_dense() -> bool:
    """Whether the encoder-weight gradient is one dense GEMM instead of a scatter of the slots."""
    return _choice("SAELAB_ENCODER_GRAD") == "dense"


def rows_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the sparse kernels gather rows of a `dtype` tensor in on `device`: `dtype`, or the autocast
    dtype with SAELAB_SPARSE_ROWS=autocast on the Triton path while autocast is on for the device. Call it
    in a Function's forward (backward runs outside the autocast region)."""
    if (
        _choice("SAELAB_SPARSE_ROWS") == "autocast"
        and sparse_backend(device) == "triton"
        and torch.is_autocast_enabled(device.type)
    ):
        return torch.get_autocast_dtype(device.type)
    return dtype


def auxk_dense(device: torch.device, n_candidates: int, aux_k: int) -> bool:
    """Whether AuxK runs as a dense product over `n_candidates` gathered dead latents."""
    choice = _choice("SAELAB_AUXK")
    if choice != "auto":
        return choice == "dense"
    return device.type != "cpu" or n_candidates <= AUXK_DENSE_MAX_RATIO * aux_k


@contextmanager
def override(**choices: str) -> Iterator[None]:
    """Temporarily force choices, e.g. `override(SAELAB_SPARSE_BACKEND="triton", SAELAB_AUXK="sparse")`."""
    for variable, value in choices.items():
        if variable not in CHOICES or value not in CHOICES[variable]:
            raise ValueError(
                f"unknown kernel choice {variable}={value!r}; see saelab.kernels.backend.CHOICES."
            )
    saved = dict(_overrides)
    _overrides.update(choices)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
