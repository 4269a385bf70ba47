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
CACHE_IDENTITY = ("cache_path", "hook_name", "hook_name_out", "reading")
#: ... and a live model source's text and how far a run's batches reach into it.
MODEL_IDENTITY = (
    "model_name",
    "model_backend",
    "hook_name",
    "hook_name_out",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "dataset_name",
    "dataset_split",
    "reading",
)
#: Planted pairs (saelab.sources.pairs) are a synthetic source with a target.
PAIRS_IDENTITY = (*SYNTHETIC_IDENTITY, "d_out", "linear_scale")
IDENTITY = {
    "synthetic": SYNTHETIC_IDENTITY,
    "pairs": PAIRS_IDENTITY,
    "cache": CACHE_IDENTITY,
    "model": MODEL_IDENTITY,
}


def check_same_synthetic_source(trained_on: dict[str, Any], source: dict[str, Any]) -> None:
    """Refuse to evaluate an SAE trained on one synthetic source against another: its planted features (the
    recovery figures) and its data would be a different problem. Other sources are not compared."""
    kind = trained_on.get("source")
    if kind not in ("synthetic", "pairs") or source.get("source") != kind:
        return
    differ = [k for k in IDENTITY[kind] if k in trained_on and trained_on[k] != source.get(k)]
    if differ:
        wanted = " ".join(f"source.{k}={trained_on[k]}" for k in differ)
        found = ", ".join(f"source.{k}={source.get(k)!r}" for k in differ)
        raise ValueError(
            f"the SAE was trained on a synthetic source with {wanted.replace(' ', ', ')}, but this evaluation's "
            f"source has {found}: its planted features and data differ. Pass {wanted}."
        )


def same_source(trained_on: dict[str, Any], source: dict[str, Any]) -> str | None:
    """ "synthetic", "cache" or "model" when the SAE trained on this very source (the same synthetic features
    and seed, the same cache read in the same order, the same model, hook and text) and recorded the batches
    it trained on; else None."""
    kind = source.get("source")
    if kind not in IDENTITY or trained_on.get("source") != kind:
        return None
    if not isinstance(trained_on.get("training_batches"), dict):
        return None
    return kind if all(trained_on.get(k) == source.get(k) for k in IDENTITY[kind]) else None


def evaluation_start(
    trained_on: dict[str, Any],
    reads: dict[str, Any],
    source: Any,
    start_batch: int,
    batch_size: int,
    tokens: int,
) -> tuple[int, bool | None]:
    """(first batch to read, whether the data read from there is held out: True, False, or None when unknown).

    trained_on: the SAE's metadata; reads: the evaluation source's (`source_metadata`); source: the
    evaluation's source object; batch_size: rows per batch (contexts per batch for a model source, whose
    evaluation reads token contexts). start_batch -1 (the default) starts past the SAE's training
    data when it trained on this source, else at 0; an explicit start_batch is kept and judged.
    - synthetic (and planted pairs): a batch is a function of its index alone, so the data past index
      `training_batches.end` is new at any batch size.
    - cache: one shuffled pass of `distinct_rows` rows, read as a row stream (batch b = rows [b * size,
      (b + 1) * size)) that starts its pass again after the last row: rows past the training rows are new up
      to the end of the pass.
    - model: training read the text up to `training_batches.contexts_read` (recorded by the trainer; for older
      SAEs the bound `ModelSource.contexts_before`, which a resumed older run may exceed); the evaluation reads
      contexts without repeating the text, so it is held out when it starts past them within the first pass.
    """
    kind = same_source(trained_on, reads)
    if kind is None:
        return max(start_batch, 0), None
    end, trained_batch = (
        int(trained_on["training_batches"]["end"]),
        int(trained_on["training_batches"]["batch_size"]),
    )
    if kind in ("synthetic", "pairs"):
        start = end if start_batch < 0 else start_batch
        return start, start >= end
    if kind == "cache":
        end_row = end * trained_batch
        start = -(-end_row // batch_size) if start_batch < 0 else start_batch
        first = start * batch_size
        return start, end_row <= first and first + tokens <= int(reads.get("distinct_rows", 0))
    recorded = trained_on["training_batches"].get("contexts_read")  # the training stream's own count
    if recorded is not None:
        end_context = int(recorded)
    else:  # an SAE from before the count: a bound (its training stream followed a held-out one if start > 0)
        streams = 2 if int(trained_on["training_batches"].get("start", 0)) > 0 else 1
        end_context = source.contexts_before(end, trained_batch, streams=streams)
    start = -(-end_context // batch_size) if start_batch < 0 else start_batch
    text_left = source.text_holds(start * batch_size)
    if start_batch < 0 and not text_left:  # no text left that training did not read
        return 0, False
    return start, end_context <= start * batch_size and text_left
