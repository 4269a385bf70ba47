"""Several hooks of one activation stream, batch by batch: what SAEs trained together read
(`saelab.train.together`).

`hook_views(source, hooks)` gives one source per hook, each serving exactly the batches a run on that hook alone
would read; `joint_batches(views, ...)` serves them together, one {hook: [B, d_hook]} item per step:

- a live model source (`for_hooks`): one harvester over every hook, so the model runs once per model batch and
  stops after the deepest hook; one mixing buffer holds the hooks' rows side by side (`ModelSource.joint_batches`);
- a cache (`for_hooks`): one reader per hook; batch b of every hook holds the same token rows, its reading order
  depending only on (seed, b);
- any other source (planted features, your own): a single "hook", None, or a dict {hook: source} whose batch
  b of each belongs together.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor


def hook_views(source: Any, hooks: Sequence[str | None]) -> dict[str | None, Any]:
    """{hook: the source of that hook's activations} for the distinct `hooks` (in order of first use)."""
    wanted = list(dict.fromkeys(hooks))
    if isinstance(source, Mapping):
        missing = [h for h in wanted if h not in source]
        if missing:
            raise ValueError(f"no source given for hooks {missing}; the sources cover {list(source)}.")
        return {h: source[h] for h in wanted}
    if hasattr(source, "for_hooks") and None not in wanted:
        return dict(source.for_hooks(wanted))
    own = getattr(source, "hook_name", None)
    if len(wanted) == 1 and wanted[0] in (None, "", own):
        return {wanted[0]: source}
    raise ValueError(
        f"jobs ask for hooks {wanted}, but a {type(source).__name__} serves one stream of activations; "
        "give each job the hook None, or pass {hook: source} (sources whose batch b belongs together)."
    )


class ZippedBatches:
    """The per-hook streams {hook: iterator of [B, d_hook]} advanced together -> {hook: [B, d_hook]}."""

    contexts_read: int | None = None

    def __init__(self, streams: dict[str | None, Iterator[Tensor]]):
        self.streams = streams

    def __iter__(self) -> ZippedBatches:
        return self

    def __next__(self) -> dict[str | None, Tensor]:
        return {hook: next(stream) for hook, stream in self.streams.items()}

    def close(self) -> None:
        for stream in self.streams.values():
            if hasattr(stream, "close"):
                stream.close()


def shared_model(views: dict[str | None, Any]) -> Any:
    """The live model source whose harvester serves every view (views built by `for_hooks`), or None when the
    views are not live model sources; views of different model passes are an error."""
    live = [v for v in views.values() if getattr(v, "repeats_text", False)]
    if not live:
        return None
    first = live[0]
    if len(live) != len(views) or any(v.pipeline is not first.pipeline for v in live):
        raise ValueError(
            "live model sources trained together must share one model pass: build them with "
            "ModelSource.for_hooks(hooks)."
        )
    return first


def joint_batches(
    views: dict[str | None, Any],
    batch_size: int,
    start_batch: int = 0,
    reserved_batches: int = 0,
    skip_contexts: int | None = None,
) -> Iterator[dict[str | None, Tensor]]:
    """Endless {hook: [batch_size, d_hook]} from batch `start_batch`: hook h's batches are those of
    `views[h].batches(batch_size, start_batch)`. reserved_batches / skip_contexts: a live model's
    (`ModelSource.batches`); the result then has `contexts_read`."""
    model = shared_model(views)
    if model is not None:
        widths = {hook: view.d_in for hook, view in views.items()}
        stream = model.joint_batches(widths, batch_size, start_batch, reserved_batches, skip_contexts)
        return stream if len(views) > 1 else _Named(next(iter(views)), stream)
    return ZippedBatches({h: iter(v.batches(batch_size, start_batch=start_batch)) for h, v in views.items()})


class _Named:
    """A one-hook live stream's plain [B, d] batches as {hook: batch}, keeping its `contexts_read`."""

    def __init__(self, hook: str | None, stream: Any):
        self.hook, self.stream = hook, stream

    @property
    def contexts_read(self) -> int:
        return self.stream.contexts_read

    def __iter__(self) -> _Named:
        return self

    def __next__(self) -> dict[str | None, Tensor]:
        return {self.hook: next(self.stream)}

    def close(self) -> None:
        self.stream.close()
