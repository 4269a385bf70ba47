"""Learning-rate schedule: linear warm-up, constant, linear decay to zero."""

from __future__ import annotations


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Factor on the base lr at `step` (0-based) of `total_steps`."""
    warmup = int(warmup_frac * total_steps)
    decay = int(decay_frac * total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    if decay and step >= decay_start:
        return max(0.0, (total_steps - step) / decay)
    return 1.0
