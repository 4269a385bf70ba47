"""Compare two settings dicts (a checkpoint's and a resumed run's) and describe what differs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def flatten(settings: Mapping[str, Any], prefix: str = "", separator: str = ".") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value} (keys joined by `separator`); values normalised through JSON
    (tuples -> lists)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}{separator}", separator))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat


def changed_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "", ignore: Iterable[str] = ()
) -> list[str]:
    """["<prefix><key>: <old> -> <new>", ...] for every flattened key whose value differs (missing keys count
    as differing), sorted by key; keys in `ignore` (without the prefix) are skipped."""
    skip = set(ignore)
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if k not in skip and a.get(k, _MISSING) != b.get(k, _MISSING))
    return [f"{prefix}{k}: {a.get(k, _MISSING)!r} -> {b.get(k, _MISSING)!r}" for k in keys]


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Missing()
