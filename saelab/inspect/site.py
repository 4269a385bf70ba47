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
`read_script` reads one back in Python. An example is stored sparsely as [site context, position, value,
offset, value, ...]: the latent's other nonzero activations in the window, at offsets from the example's
position (the window's zeros are not stored). Activations keep 3 significant digits.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from saelab.core.atomic import atomic_directory, atomic_file
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


class ExampleTable:
    """Examples of a block of latents in the site's sparse form (module docstring): values, tokens [L, k] and
    windows [L, k, W] of the block's latents."""

    def __init__(self, data: FeatureData, values, tokens, windows):
        T = data.context_size
        L, k = tokens.shape
        self.valid = (tokens >= 0).tolist()
        ctx, pos = tokens.clamp_min(0) // T, tokens.clamp_min(0) % T
        if data.context_ids.numel():
            row = torch.searchsorted(data.context_ids, ctx).clamp_max(data.context_ids.numel() - 1)
        else:
            row = torch.zeros_like(ctx)
        self.context, self.pos, self.value = row.tolist(), pos.tolist(), rounded(values.float(), 3)
        offsets = torch.arange(windows.shape[-1]) - data.window_before
        nonzero = (windows != 0) & ~windows.isnan() & (offsets != 0)
        where = nonzero.nonzero()  # [M, 3] (latent, example, window position), sorted
        self.extra: list[list[list[Any]]] = [[[] for _ in range(k)] for _ in range(L)]
        acts = rounded(windows[nonzero].float(), 3)
        for (r, j, _), offset, act in zip(where.tolist(), offsets[where[:, 2]].tolist(), acts, strict=True):
            self.extra[r][j] += [offset, act]

    def rows(self, r: int) -> list[list[Any]]:
        """The valid examples of the block's r-th latent."""
        return [
            [self.context[r][j], self.pos[r][j], self.value[r][j], *self.extra[r][j]]
            for j, valid in enumerate(self.valid[r])
            if valid
        ]


def _pairs(ids: torch.Tensor | None, values: torch.Tensor | None, latents: range) -> list[list[list[Any]]]:
    """Per latent of the block: [[id, value], ...] of a ranked list (empty without data; id -1 dropped)."""
    if ids is None or values is None:
        return [[] for _ in latents]
    block_ids = ids[latents.start : latents.stop].tolist()
    block_values = rounded(values[latents.start : latents.stop], 4)
    return [
        [[i, v] for i, v in zip(row_ids, row_values, strict=True) if i >= 0]
        for row_ids, row_values in zip(block_ids, block_values, strict=True)
    ]


def _cofiring(data: FeatureData, latents: range) -> list[list[list[Any]]]:
    """Per latent of the block: [[partner, exact count, Jaccard], ...]."""
    block = slice(latents.start, latents.stop)
    ids, counts = data.cofiring_ids[block].tolist(), data.cofiring_counts[block].tolist()
    jaccard = rounded(data.cofiring_jaccard[block], 3)
    return [
        [[j, c, s] for j, c, s in zip(*row, strict=True) if j >= 0 and c > 0]
        for row in zip(ids, counts, jaccard, strict=True)
    ]


def latent_records(data: FeatureData, latents: range) -> list[dict[str, Any]]:
    """Everything the latent panel shows, for each latent of a block."""
    block = slice(latents.start, latents.stop)
    L = len(latents)
    top = ExampleTable(data, data.top_value[block], data.top_token[block], data.top_window[block])
    n_bands, per_band = data.band_value.shape[1:3]
    bands = ExampleTable(
        data,
        data.band_value[block].reshape(L, -1),
        data.band_token[block].reshape(L, -1),
        data.band_window[block].reshape(L, n_bands * per_band, -1),
    )
    band_tokens = data.band_token[block].tolist()
    band_counts = data.band_count[block].tolist()
    lists = {
        "promoted": _pairs(data.promoted_ids, data.promoted_logits, latents),
        "suppressed": _pairs(data.suppressed_ids, data.suppressed_logits, latents),
        "nearest": _pairs(data.nearest_ids, data.nearest_cos, latents),
        "cofiring": _cofiring(data, latents),
    }
    scales = data.band_scale[block].tolist()
    records = []
    for r, i in enumerate(latents):
        hist = data.hist_counts[i]
        nonzero = hist.nonzero().flatten()
        examples = iter(bands.rows(r))
        band_rows = []
        for b in range(n_bands):
            held = [next(examples) for t in band_tokens[r][b] if t >= 0]
            if band_counts[r][b]:
                band_rows.append([b, band_counts[r][b], sorted(held, key=lambda e: -e[2])])
        record = {
            "top": top.rows(r),
            "scale": scales[r],
            "bands": band_rows[::-1],
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
            rows = data.context_tokens[start : start + CONTEXTS_PER_FILE].tolist()
            (folder / f"contexts_{k}.js").write_text(script("SAELAB_CONTEXTS", rows, k), encoding="utf-8")
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
