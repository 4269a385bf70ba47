"""Write `FeatureData` as a static site that opens from disk (file://, no server) or is served locally.

Layout under the output directory:
    index.html, app.js, style.css   copied from saelab/inspect/static
    data/index.js                   per-latent summary rows (density, max / mean activation, max cosine, ...)
    data/vocab.js                   token id -> text for every token shown
    data/latents_<k>.js             latents [k * L, (k + 1) * L): examples, histograms, tokens, neighbours
    data/contexts_<k>.js            token ids of the stored contexts, each context once
    data/random.js                  uniformly sampled token windows and the latents firing in each
    data/explanations.js            explanations and their scores (`saelab.inspect.explain`), maybe none

Data files are scripts that assign globals (`window.SAELAB_*`), since browsers refuse fetch() on file://;
`read_script` reads one back in Python. The bulk numbers (examples, ranked lists, co-firing, context tokens) are
binary, base64 inside the JSON (`saelab.inspect.codec`): an example is its context, position and value plus the
latent's other nonzero activations in its window (zeros are not stored), activations in float16.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.core.atomic import atomic_directory, atomic_file
from saelab.inspect.codec import ExampleCodec, encode_cofiring, encode_pairs, encode_tokens, field_bytes
from saelab.inspect.data import FeatureData

STATIC_FILES = ("index.html", "app.js", "style.css")
CONTEXTS_PER_FILE = 512
EXPLANATIONS_FILE = "data/explanations.js"


def rounded(values: torch.Tensor, digits: int = 4) -> list:
    """Values rounded to `digits` significant digits (exactly representable decimals, so JSON stays short)."""
    x = values.double()
    exponent = torch.floor(torch.log10(x.abs().clamp_min(1e-300)))
    shift = (digits - 1 - exponent).clamp(-300, 300)
    up = torch.round(x * 10.0 ** shift.clamp_min(0)) / 10.0 ** shift.clamp_min(0)
    down = torch.round(x / 10.0 ** (-shift).clamp_min(0)) * 10.0 ** (-shift).clamp_min(0)
    out = torch.where(shift >= 0, up, down)
    return torch.where(x == 0, x, out).tolist()


def script(name: str, payload: Any, key: int | None = None) -> str:
    """JavaScript that stores `payload` in window.<name> (or window.<name>[key]); NaN stays NaN."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if key is None:
        return f"window.{name} = {text};\n"
    return f"window.{name} = window.{name} || {{}};\nwindow.{name}[{key}] = {text};\n"


_SCRIPT = re.compile(r"^(?:window\.\w+ = window\.\w+ \|\| \{\};\n)?window\.\w+(?:\[\d+\])? = (.*);\n?$", re.S)


def read_script(path: str | Path) -> Any:
    """The payload of a data file written by `script`."""
    text = Path(path).read_text(encoding="utf-8")
    match = _SCRIPT.match(text)
    if match is None:
        raise ValueError(f"{path} is not a saelab inspect data file.")
    return json.loads(match.group(1))


def example_codec(data: FeatureData) -> ExampleCodec:
    """The example layout for the site of `data` (field widths from its contexts' count and length)."""
    return ExampleCodec(field_bytes(data.context_ids.numel(), 2), field_bytes(data.context_size, 1))


def encode_examples(data: FeatureData, values: Tensor, tokens: Tensor, windows: Tensor) -> list[str]:
    """Groups of examples (a latent's top list, or one activation interval's sample): values, tokens [G, k]
    (token -1: empty) and windows [G, k, W] -> one string per group, its examples by value, descending."""
    G, k = tokens.shape
    order = torch.where(tokens >= 0, -values.float(), torch.inf).argsort(dim=1, stable=True)
    tokens, values = tokens.gather(1, order), values.gather(1, order)
    windows = windows.gather(1, order[..., None].expand_as(windows))
    group, slot = (tokens >= 0).nonzero(as_tuple=True)
    token = tokens[group, slot]
    if data.context_ids.numel():
        context = torch.searchsorted(data.context_ids, token // data.context_size)
    else:
        context = torch.zeros_like(token)
    extras = windows[group, slot].float().nan_to_num(0.0)
    extras[:, data.window_before] = 0
    return example_codec(data).encode(
        group, context, token % data.context_size, values[group, slot], extras, data.window_before, G
    )


def latent_records(data: FeatureData, latents: range) -> list[dict[str, Any]]:
    """Everything the latent panel shows, for each latent of a block."""
    block = slice(latents.start, latents.stop)
    L = len(latents)
    top = encode_examples(data, data.top_value[block], data.top_token[block], data.top_window[block])
    n_bands, per_band = data.band_value.shape[1:3]
    bands = encode_examples(
        data,
        data.band_value[block].reshape(L * n_bands, per_band),
        data.band_token[block].reshape(L * n_bands, per_band),
        data.band_window[block].reshape(L * n_bands, per_band, -1),
    )
    band_counts = data.band_count[block].tolist()
    lists: dict[str, list[str]] = {}
    for name, ids, values in (
        ("promoted", data.promoted_ids, data.promoted_logits),
        ("suppressed", data.suppressed_ids, data.suppressed_logits),
        ("nearest", data.nearest_ids, data.nearest_cos),
    ):
        lists[name] = encode_pairs(ids[block], values[block]) if ids is not None else [""] * L
    lists["cofiring"] = encode_cofiring(
        data.cofiring_ids[block], data.cofiring_counts[block], data.cofiring_jaccard[block]
    )
    scales = data.band_scale[block].tolist()
    records = []
    for r, i in enumerate(latents):
        hist = data.hist_counts[i]
        nonzero = hist.nonzero().flatten()
        record = {
            "top": top[r],
            "scale": scales[r],
            "bands": [
                [b, band_counts[r][b], bands[r * n_bands + b]]
                for b in reversed(range(n_bands))
                if band_counts[r][b]
            ],
            "hist": list(zip(nonzero.tolist(), hist[nonzero].tolist(), strict=True)),
            **{name: rows[r] for name, rows in lists.items()},
            "cofiring_error": int(data.cofiring_error[i]),
        }
        if data.logit_hist_counts is not None and data.logit_hist_range is not None:
            record["logit_hist"] = [*rounded(data.logit_hist_range[i], 3), data.logit_hist_counts[i].tolist()]
        records.append(record)
    return records


def top_token_ids(data: FeatureData) -> list[list[int]]:
    """Per latent, the distinct tokens at which its top examples fire, in order of activation."""
    T = data.context_size
    if data.context_ids.numel() == 0:
        return [[] for _ in range(data.d_sae)]
    tokens = data.top_token.clamp_min(0)
    rows = torch.searchsorted(data.context_ids, tokens // T).clamp_max(data.context_ids.numel() - 1)
    ids = data.context_tokens[rows, tokens % T].tolist()
    valid = (data.top_token >= 0).tolist()
    return [
        list(dict.fromkeys(t for t, ok in zip(row, ok_row, strict=True) if ok))
        for row, ok_row in zip(ids, valid, strict=True)
    ]


def index_record(data: FeatureData, latents_per_file: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """The summary the index page lists and searches."""
    return {
        "meta": {
            "d_sae": data.d_sae,
            "hook_name": data.hook_name,
            "n_tokens": data.n_tokens,
            "n_contexts": data.n_contexts,
            "context_size": data.context_size,
            "window_before": data.window_before,
            "window_after": data.window_after,
            "latents_per_file": latents_per_file,
            "contexts_per_file": CONTEXTS_PER_FILE,
            "n_bands": data.band_count.shape[1],
            "context_bytes": example_codec(data).context_bytes,
            "position_bytes": example_codec(data).position_bytes,
            "token_bytes": token_width(data),
            "hist_edges": [float(e) for e in data.hist_edges.tolist()],
            "logit_note": data.logit_note,
            "cofiring_cap": data.cofiring_cap,
            **data.metadata,
            **metadata,
        },
        "fires": data.fire_count.tolist(),
        "density": rounded(data.density),
        "max": rounded(data.act_max),
        "mean": rounded(data.mean_act),
        "maxcos": rounded(data.max_cos),
        "tokens": top_token_ids(data),
    }


def token_width(data: FeatureData) -> int:
    """Bytes per stored token id: 2 unless some id shown needs more."""
    largest = max(
        [*data.vocab, int(data.context_tokens.max()) if data.context_tokens.numel() else 0], default=0
    )
    return 2 if largest < 2**16 else 4


def random_windows(data: FeatureData) -> list[list[Any]]:
    """[[site context, position, [latents firing in the window]], ...] of the sampled token windows."""
    T = data.context_size
    out = []
    for token, latents in zip(data.random_token.tolist(), data.random_latents, strict=True):
        if token >= 0:
            row = int(torch.searchsorted(data.context_ids, torch.tensor(token // T)))
            out.append([row, token % T, latents.tolist()])
    return out


def write_site(
    data: FeatureData,
    out_dir: str | Path,
    latents_per_file: int = 256,
    metadata: dict[str, Any] | None = None,
    explanations: dict[str, Any] | None = None,
) -> Path:
    """Write the browser for `data` into `out_dir` (replaced atomically); returns the path of index.html.
    explanations: a payload for data/explanations.js (e.g. kept from the site this one replaces)."""
    if latents_per_file <= 0:
        raise ValueError(f"latents_per_file={latents_per_file} must be > 0.")
    with atomic_directory(out_dir, owned=[*STATIC_FILES, "data"]) as tmp:
        static = resources.files("saelab.inspect") / "static"
        for name in STATIC_FILES:
            with resources.as_file(static / name) as path:
                shutil.copyfile(path, tmp / name)
        folder = tmp / "data"
        folder.mkdir()
        index = index_record(data, latents_per_file, metadata or {})
        (folder / "index.js").write_text(script("SAELAB_INDEX", index), encoding="utf-8")
        vocab = {str(k): v for k, v in data.vocab.items()}
        (folder / "vocab.js").write_text(script("SAELAB_VOCAB", vocab), encoding="utf-8")
        for k, start in enumerate(range(0, data.d_sae, latents_per_file)):
            stop = min(start + latents_per_file, data.d_sae)
            records = latent_records(data, range(start, stop))
            (folder / f"latents_{k}.js").write_text(script("SAELAB_LATENTS", records, k), encoding="utf-8")
        for k, start in enumerate(range(0, data.context_ids.numel(), CONTEXTS_PER_FILE)):
            rows = data.context_tokens[start : start + CONTEXTS_PER_FILE]
            packed = encode_tokens(rows.reshape(-1), token_width(data))
            (folder / f"contexts_{k}.js").write_text(script("SAELAB_CONTEXTS", packed, k), encoding="utf-8")
        (folder / "random.js").write_text(script("SAELAB_RANDOM", random_windows(data)), encoding="utf-8")
        payload = explanations or {"latents": {}}
        (tmp / EXPLANATIONS_FILE).write_text(script("SAELAB_EXPLANATIONS", payload), encoding="utf-8")
    return Path(out_dir).expanduser() / "index.html"


def read_explanations(site: str | Path) -> dict[str, Any]:
    """The explanations payload of a site ({"latents": {}} when it has none)."""
    path = Path(site) / EXPLANATIONS_FILE
    return read_script(path) if path.exists() else {"latents": {}}


def write_explanations(site: str | Path, payload: dict[str, Any]) -> Path:
    """Replace the site's data/explanations.js atomically."""
    path = Path(site) / EXPLANATIONS_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(script("SAELAB_EXPLANATIONS", payload), encoding="utf-8")
    return path
