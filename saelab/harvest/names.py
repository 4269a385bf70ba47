"""Hook-name validation shared by the harvesters: an unknown name is an error that lists near matches."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence


class UnknownHookError(ValueError):
    """A requested hook name that the model does not have."""


def check_hook_names(requested: Sequence[str], available: Collection[str], kind: str) -> list[str]:
    """Return `requested` as a de-duplicated list; raise UnknownHookError naming near matches for an unknown name.

    kind: what the names refer to, e.g. "TransformerLens hook point" or "submodule of LlamaForCausalLM".
    """
    if isinstance(requested, str):
        requested = [requested]
    if not requested:
        raise ValueError("no hook names given; set source.hook_name (or hook_names for `saelab harvest`).")
    names = list(dict.fromkeys(requested))
    pool = sorted(available)
    for name in names:
        if name not in available:
            near = difflib.get_close_matches(name, pool, n=6, cutoff=0.6)
            hint = f" Did you mean one of {near}?" if near else f" Some valid names: {pool[:8]}."
            raise UnknownHookError(f"{name!r} is not a {kind} ({len(pool)} available).{hint}")
    return names
