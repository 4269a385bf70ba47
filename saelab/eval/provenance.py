"""Which data an evaluation reads, relative to the data the SAE was trained on.

A trained SAE's metadata names its source (`source.metadata()`, e.g. a synthetic source's structure,
n_features and seed) and the batch indices it trained on (`training_batches`, written by the trainer). A
synthetic batch is a pure function of (seed, index), so for the same synthetic source the batches from index
`training_batches.end` on were never trained on, whatever the batch size.
"""

from __future__ import annotations

from typing import Any


def check_hook(sae_hook: str | None, source_hook: str | None) -> None:
    """Refuse a source read at another hook than the SAE was trained at (equal widths would hide it)."""
    if sae_hook and source_hook and sae_hook != source_hook:
        raise ValueError(
            f"the SAE was trained at hook {sae_hook!r} but source.hook_name={source_hook!r}; "
            f"pass source.hook_name={sae_hook} (or the same hook under the backend you use)."
        )


#: Fields that decide a synthetic source's features and batches.
SYNTHETIC_IDENTITY = ("structure", "n_features", "seed")


def check_same_synthetic_source(trained_on: dict[str, Any], source: dict[str, Any]) -> None:
    """Refuse to evaluate an SAE trained on one synthetic source against another: its planted features (the
    recovery figures) and its data would be a different problem. Other sources are not compared."""
    if trained_on.get("source") != "synthetic" or source.get("source") != "synthetic":
        return
    differ = [k for k in SYNTHETIC_IDENTITY if k in trained_on and trained_on[k] != source.get(k)]
    if differ:
        wanted = " ".join(f"source.{k}={trained_on[k]}" for k in differ)
        found = ", ".join(f"source.{k}={source.get(k)!r}" for k in differ)
        raise ValueError(
            f"the SAE was trained on a synthetic source with {wanted.replace(' ', ', ')}, but this evaluation's "
            f"source has {found}: its planted features and data differ. Pass {wanted}."
        )


def same_indexed_source(trained_on: dict[str, Any], source: dict[str, Any]) -> bool:
    """Whether the SAE trained on this very synthetic source (so its batch indices mean the same data)."""
    return (
        trained_on.get("source") == source.get("source") == "synthetic"
        and all(trained_on.get(k) == source.get(k) for k in SYNTHETIC_IDENTITY)
        and isinstance(trained_on.get("training_batches"), dict)
    )


def evaluation_start(
    trained_on: dict[str, Any], source: dict[str, Any], start_batch: int
) -> tuple[int, bool | None]:
    """(first batch to read, whether that data is held out: True, False, or None when unknown).

    start_batch -1 (the default) starts past the SAE's training batches when it trained on this source, else
    at 0; an explicit start_batch is kept, and judged held out when it is past them."""
    if not same_indexed_source(trained_on, source):
        return max(start_batch, 0), None
    end = int(trained_on["training_batches"]["end"])
    start = end if start_batch < 0 else start_batch
    return start, start >= end
