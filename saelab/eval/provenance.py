"""Which data an evaluation reads, relative to the data the SAE was trained on.

A trained SAE's metadata names its source (`source.metadata()`: a synthetic source's structure, n_features
and seed; a cache's path, hook and reading order) and the batch indices it trained on (`training_batches`,
written by the trainer), so an evaluation of the same source can start past them (`evaluation_start`).
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


#: Fields that decide a synthetic source's features and batches, and a cache source's rows and their order.
SYNTHETIC_IDENTITY = ("structure", "n_features", "seed")
CACHE_IDENTITY = ("cache_path", "hook_name", "reading")


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


def same_source(trained_on: dict[str, Any], source: dict[str, Any]) -> str | None:
    """ "synthetic" or "cache" when the SAE trained on this very source (the same synthetic features and seed,
    or the same cache read in the same order) and recorded the batches it trained on; else None."""
    if not isinstance(trained_on.get("training_batches"), dict):
        return None
    kind = source.get("source")
    if kind == trained_on.get("source") == "synthetic":
        same = all(trained_on.get(k) == source.get(k) for k in SYNTHETIC_IDENTITY)
    elif kind == trained_on.get("source") == "cache":
        same = all(trained_on.get(k) == source.get(k) for k in CACHE_IDENTITY)
    else:
        return None
    return kind if same else None


def evaluation_start(
    trained_on: dict[str, Any], source: dict[str, Any], start_batch: int, batch_size: int, tokens: int
) -> tuple[int, bool | None]:
    """(first batch of `batch_size` rows to read, whether the `tokens` rows read from there are held out: True,
    False, or None when unknown).

    start_batch -1 (the default) starts past the SAE's training data when it trained on this source, else at
    0; an explicit start_batch is kept and judged. A synthetic batch is a function of its index alone, so the
    data past index `training_batches.end` is new at any batch size. A cache is one shuffled pass of
    `distinct_rows` rows, read as a row stream (batch b = rows [b * size, (b + 1) * size)) that starts its
    pass again after the last row: the rows past the training rows are new up to the end of the pass."""
    kind = same_source(trained_on, source)
    if kind is None:
        return max(start_batch, 0), None
    batches = trained_on["training_batches"]
    if kind == "synthetic":
        end = int(batches["end"])
        start = end if start_batch < 0 else start_batch
        return start, start >= end
    end_row = int(batches["end"]) * int(batches["batch_size"])
    start = -(-end_row // batch_size) if start_batch < 0 else start_batch
    first = start * batch_size
    return start, end_row <= first and first + tokens <= int(source.get("distinct_rows", 0))
