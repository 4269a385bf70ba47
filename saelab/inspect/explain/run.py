"""Explain the latents of a written site and score the explanations; or import explanations from JSON.

Per latent (`explain_latent`): the explainer sees the `n_explain_top` top examples and a random half of each
activation interval's sample; the other halves (highest interval first, taken in turn) and the remaining top
examples, less any the explainer saw, are the held-out activating examples; the non-activating ones are the
site's random windows in which the latent never fires. The result is stored in the site's
data/explanations.js (saved every `SAVE_EVERY` latents, so an interrupted run keeps its work):

    {"latents": {"12": {"text": "...", "by": "openai:gpt-4o-mini", "detection": 0.85, "fuzzing": 0.7,
                        "scored_on": [10, 10], "failures": 0}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.core.seeds import generator
from saelab.inspect.explain.clients import Client
from saelab.inspect.explain.config import ExplainConfig
from saelab.inspect.explain.prompts import explanation_messages, parse_explanation
from saelab.inspect.explain.scoring import detection_score, fuzzing_score
from saelab.inspect.site import read_explanations, write_explanations
from saelab.inspect.site_reader import SiteExample, SiteReader

SAVE_EVERY = 20


def split_examples(site: SiteReader, latent: int, cfg: ExplainConfig) -> tuple[list, list]:
    """(examples shown to the explainer, held-out activating examples) of a latent (module docstring)."""
    gen = generator(cfg.seed, "explain.split", latent)
    top = site.top(latent)
    shown, held_bands = list(top[: cfg.n_explain_top]), []
    for _, _, examples in site.bands(latent):
        order = [examples[i] for i in _permutation(len(examples), gen)]
        held_bands.append(order[: len(order) // 2])
        shown += order[len(order) // 2 :]
    seen = {ex.key for ex in shown}
    held = [ex for ex in [*_round_robin(held_bands), *top[cfg.n_explain_top :]] if ex.key not in seen]
    unique = list({ex.key: ex for ex in held}.values())
    return shown, unique[: cfg.n_score]


def _permutation(n: int, gen: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=gen).tolist()


def _round_robin(groups: list[list[SiteExample]]) -> Iterator[SiteExample]:
    for i in range(max((len(g) for g in groups), default=0)):
        yield from (g[i] for g in groups if i < len(g))


def negatives(
    latent: int, windows: list[tuple[SiteExample, set[int]]], count: int, cfg: ExplainConfig
) -> list[SiteExample]:
    """Up to `count` random windows in which the latent does not fire, in a random order."""
    quiet = [ex for ex, firing in windows if latent not in firing]
    gen = generator(cfg.seed, "explain.negatives", latent)
    return [quiet[i] for i in _permutation(len(quiet), gen)[:count]]


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def explain_latent(
    site: SiteReader,
    latent: int,
    client: Client,
    cfg: ExplainConfig,
    windows: list[tuple[SiteExample, set[int]]],
) -> dict[str, Any] | None:
    """Explain one latent and score the explanation on held-out examples; None for a latent without examples."""
    shown, held = split_examples(site, latent, cfg)
    if not shown:
        return None
    peak = max((max(ex.acts) for ex in shown), default=0.0)
    text = parse_explanation(client.complete(explanation_messages(shown, peak)))
    result: dict[str, Any] = {"text": text, "by": client.name, "failures": 0}
    if not text or not held:
        return result
    gen = generator(cfg.seed, "explain.scoring", latent)
    if "detection" in cfg.scorers:
        negs = negatives(latent, windows, len(held), cfg)
        score = detection_score(client, text, held, negs, cfg.examples_per_prompt, gen)
        result["detection"] = _finite(score.balanced_accuracy)
        result["scored_on"] = [score.n_positive, score.n_negative]
        result["failures"] += score.failures
    if "fuzzing" in cfg.scorers:
        score = fuzzing_score(client, text, held, cfg.examples_per_prompt, gen)
        result["fuzzing"] = _finite(score.balanced_accuracy)
        result["failures"] += score.failures
    return result


def latents_to_explain(site: SiteReader, cfg: ExplainConfig, done: dict[str, Any]) -> list[int]:
    """cfg.latents (checked against the site), else the first cfg.limit latents that fire (0: all); without
    cfg.overwrite, those already explained are left out."""
    if cfg.latents:
        bad = [i for i in cfg.latents if not 0 <= i < site.d_sae]
        if bad:
            raise ValueError(f"explain.latents names {bad}, outside this SAE's latents 0-{site.d_sae - 1}.")
        chosen = list(dict.fromkeys(cfg.latents))
    else:
        live = site.live_latents()
        chosen = live[: cfg.limit] if cfg.limit else live
    return [i for i in chosen if cfg.overwrite or str(i) not in done]


def explain_site(site_dir: str | Path, client: Client, cfg: ExplainConfig, progress: bool = False) -> dict:
    """Explain and score the latents `cfg` picks; returns the site's explanations payload (also written)."""
    cfg.validate()
    site = SiteReader(site_dir)
    payload = read_explanations(site_dir)
    latents = latents_to_explain(site, cfg, payload["latents"])
    windows = site.random_windows()
    workers = cfg.concurrency if client.concurrent else 1

    def one(latent: int) -> tuple[int, dict[str, Any] | None]:
        return latent, explain_latent(site, latent, client, cfg, windows)

    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(latents), desc="explain", unit="latent", disable=not progress) as bar,
    ):
        for n, (latent, result) in enumerate(pool.map(one, latents), 1):
            if result is not None:  # a latent that never fired has nothing to explain
                payload["latents"][str(latent)] = result
            bar.update()
            if n % SAVE_EVERY == 0:
                write_explanations(site_dir, payload)
    write_explanations(site_dir, payload)
    return payload


#: Field names read from imported entries, first match wins.
ID_FIELDS = ("index", "latent", "feature", "feature_index", "featureIndex", "neuron")
TEXT_FIELDS = ("description", "explanation", "text", "label")
BY_FIELDS = ("explanationModelName", "explainer", "by", "model")


def imported_entries(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(latent, {"text", "by"}) for each entry of a JSON file: a list of objects (a Neuronpedia export:
    index + description), {"explanations": [...]}, JSON lines, or a {latent: text} mapping."""
    raw = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if isinstance(data, dict) and isinstance(data.get("explanations"), list):
        data = data["explanations"]
    if isinstance(data, dict):
        data = [{"index": k, "description": v} for k, v in data.items()]
    out = []
    for n, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {n} is not a JSON object.")
        key = next((f for f in ID_FIELDS if f in entry), None)
        text = next((entry[f] for f in TEXT_FIELDS if isinstance(entry.get(f), str)), None)
        if key is None or text is None:
            raise ValueError(
                f"{path}: entry {n} needs a latent id ({' / '.join(ID_FIELDS)}) and a text "
                f"({' / '.join(TEXT_FIELDS)}); it has {sorted(entry)}."
            )
        try:
            latent = int(entry[key])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {n} has {key}={entry[key]!r}, not a latent id.") from None
        by = next((str(entry[f]) for f in BY_FIELDS if entry.get(f)), "imported")
        out.append((latent, {"text": text.strip(), "by": by, "imported_from": path.name}))
    return out


def import_explanations(site_dir: str | Path, file: str | Path, overwrite: bool = False) -> tuple[dict, int]:
    """Add the explanations of a JSON file to the site (the first per latent; existing ones are kept unless
    `overwrite`); returns the payload and how many were added."""
    site = SiteReader(site_dir)
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"explain.import_file={str(file)!r} is not a file.")
    entries = imported_entries(path)
    bad = sorted({latent for latent, _ in entries if not 0 <= latent < site.d_sae})
    if bad:
        raise ValueError(
            f"{path} names latents {bad[:5]}{' ...' if len(bad) > 5 else ''} outside this SAE's 0-{site.d_sae - 1}: "
            "is it the export of another SAE?"
        )
    payload = read_explanations(site_dir)
    added = 0
    taken: set[int] = set()
    for latent, entry in entries:
        if latent in taken or (str(latent) in payload["latents"] and not overwrite):
            continue
        taken.add(latent)
        payload["latents"][str(latent)] = entry
        added += 1
    write_explanations(site_dir, payload)
    return payload, added
