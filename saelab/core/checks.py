"""Validation of config fields: numbers finite, of the right kind and in range; flags true bools. Messages name
the field."""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral, Real


def check_number(
    field: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Raise ValueError unless `value` is a finite number (an integer if `integer`) within [low, high]
    (an open end where low_open / high_open). `field` is the full name shown to the user, e.g. "trainer.lr"."""
    kind = "an integer" if integer else "a finite number"
    bounds = _describe(low, high, low_open, high_open)
    wanted = f"{bounds} ({kind})" if bounds else kind
    ok_type = isinstance(value, Integral) if integer else isinstance(value, Real)
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{field}={value!r} must be {wanted}.{' ' + hint if hint else ''}")
    v = float(value)  # type: ignore[arg-type]
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise ValueError(f"{field}={value!r} must be {wanted}.{' ' + hint if hint else ''}")


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_flags(config: object, section: str) -> None:
    """Raise ValueError for a bool field of dataclass `config` holding anything but True or False (from Python
    code a string such as "false" would otherwise count as True; the CLI's structured configs type-check)."""
    for spec in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, spec.name)
        if spec.type in ("bool", bool) and not isinstance(value, bool):
            raise ValueError(f"{section}.{spec.name}={value!r} must be True or False.")
