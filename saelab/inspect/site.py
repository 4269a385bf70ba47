"""Write `FeatureData` as a static site that opens from disk (file://, no server) or is served locally.

Layout under the output directory:
    index.html, app.js, style.css   copied from saelab/inspect/static
    data/index.js                   per-latent summary rows (density, max / mean activation, max cosine, ...)
    data/vocab.js                   token id -> text for every token shown
    data/latents_<k>.js             latents [k * L, (k + 1) * L): examples, histogram, tokens, neighbours
    data/contexts_<k>.js            token ids of the stored contexts, each context once

Data files are scripts that assign globals (`window.SAELAB_*`), since browsers refuse fetch() on file://.
`serve(out_dir, port)` serves the folder on http://127.0.0.1:<port>/ with Python's http.server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from saelab.core.atomic import atomic_directory
from saelab.inspect.data import FeatureData

STATIC_FILES = ("index.html", "app.js", "style.css")
CONTEXTS_PER_FILE = 512


def rounded(values: torch.Tensor, digits: int = 4) -> list:
    """Values rounded to `digits` significant digits (exactly representable decimals, so JSON stays short)."""
    x = values.double()
    exponent = torch.floor(torch.log10(x.abs().clamp_min(1e-300)))
    shift = (digits - 1 - exponent).clamp(-300, 300)
    up = torch.round(x * 10.0 ** shift.clamp_min(0)) / 10.0 ** shift.clamp_min(0)
    down = torch.round(x / 10.0 ** (-shift).clamp_min(0)) * 10.0 ** (-shift).clamp_min(0)
    out = torch.where(shift >= 0, up, down)
    return torch.where(x == 0, x, out).tolist()


def decimals(values: torch.Tensor, places: int = 3) -> list:
    """Values rounded to `places` decimals (activations shown on the page; cheaper than `rounded`)."""
    scale = 10.0**places
    return (torch.round(values.double() * scale) / scale).tolist()


def _script(name: str, payload: Any, key: int | None = None) -> str:
    """JavaScript that stores `payload` in window.<name> (or window.<name>[key]); NaN stays NaN."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if key is None:
        return f"window.{name} = {text};\n"
    return f"window.{name} = window.{name} || {{}};\nwindow.{name}[{key}] = {text};\n"


class ExampleTable:
    """One kind of example (top or samples) of a block of latents, in the site's form:
    [value, site context, position, window start, activations from the window start to the context's end]."""

    def __init__(
        self, data: FeatureData, site_context: torch.Tensor, values, tokens, windows, latents: range
    ):
        T, before, after = data.context_size, data.window_before, data.window_after
        tokens = tokens[latents.start : latents.stop]
        self.valid = (tokens >= 0).tolist()
        ctx, pos = tokens.clamp_min(0) // T, tokens.clamp_min(0) % T
        row = torch.searchsorted(data.context_ids, ctx).clamp_max(max(site_context.numel() - 1, 0))
        self.context = (site_context[row] if site_context.numel() else torch.zeros_like(ctx)).tolist()
        self.pos = pos.tolist()
        self.start = (pos - before).clamp_min(0).tolist()
        self.skip = ((pos - before).clamp_min(0) - (pos - before)).tolist()
        self.length = ((pos + after + 1).clamp_max(T) - (pos - before).clamp_min(0)).tolist()
        self.value = decimals(values[latents.start : latents.stop], 4)
        self.windows = decimals(windows[latents.start : latents.stop])

    def rows(self, r: int) -> list[list[Any]]:
        out = []
        for j, valid in enumerate(self.valid[r]):
            if valid:
                skip, length = self.skip[r][j], self.length[r][j]
                acts = self.windows[r][j][skip : skip + length]
                out.append([self.value[r][j], self.context[r][j], self.pos[r][j], self.start[r][j], acts])
        return out


def _pairs(ids: torch.Tensor | None, values: torch.Tensor | None, latents: range) -> list[list[list[Any]]]:
    """Per latent of the block: [[id, value], ...] of a ranked list (empty without data; id -1 dropped)."""
    if ids is None or values is None:
        return [[] for _ in latents]
    block_ids = ids[latents.start : latents.stop].tolist()
    block_values = decimals(values[latents.start : latents.stop], 4)
    return [
        [[i, v] for i, v in zip(row_ids, row_values, strict=True) if i >= 0]
        for row_ids, row_values in zip(block_ids, block_values, strict=True)
    ]


def latent_records(data: FeatureData, latents: range) -> list[dict[str, Any]]:
    """Everything the latent panel shows, for each latent of a block."""
    site_context = torch.arange(data.context_ids.numel())
    top = ExampleTable(data, site_context, data.top_value, data.top_token, data.top_window, latents)
    samples = ExampleTable(
        data, site_context, data.sample_value, data.sample_token, data.sample_window, latents
    )
    lists = {
        "promoted": _pairs(data.promoted_ids, data.promoted_logits, latents),
        "suppressed": _pairs(data.suppressed_ids, data.suppressed_logits, latents),
        "nearest": _pairs(data.nearest_ids, data.nearest_cos, latents),
        "cofiring": _pairs(data.cofiring_ids, data.cofiring_counts, latents),
    }
    records = []
    for r, i in enumerate(latents):
        hist = data.hist_counts[i]
        nonzero = hist.nonzero().flatten()
        records.append(
            {
                "id": i,
                "top": top.rows(r),
                "samples": sorted(samples.rows(r), key=lambda e: -e[0]),
                "hist": list(zip(nonzero.tolist(), hist[nonzero].tolist(), strict=True)),
                **{name: rows[r] for name, rows in lists.items()},
                "cofiring_error": int(data.cofiring_error[i]),
            }
        )
    return records


def top_token_ids(data: FeatureData) -> list[list[int]]:
    """Per latent, the distinct tokens at which its top examples fire, in order of activation."""
    T = data.context_size
    tokens = data.top_token.clamp_min(0)
    rows = torch.searchsorted(data.context_ids, tokens // T).clamp_max(max(data.context_ids.numel() - 1, 0))
    if data.context_ids.numel() == 0:
        return [[] for _ in range(data.d_sae)]
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
            "latents_per_file": latents_per_file,
            "contexts_per_file": CONTEXTS_PER_FILE,
            "hist_edges": [float(e) for e in data.hist_edges.tolist()],
            "logit_note": data.logit_note,
            "cofiring_cap": data.cofiring_cap,
            **metadata,
        },
        "fires": data.fire_count.tolist(),
        "density": rounded(data.density),
        "max": rounded(data.act_max),
        "mean": rounded(data.mean_act),
        "maxcos": rounded(data.max_cos),
        "tokens": top_token_ids(data),
    }


def write_site(
    data: FeatureData,
    out_dir: str | Path,
    latents_per_file: int = 256,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the browser for `data` into `out_dir` (replaced atomically); returns the path of index.html."""
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
        (folder / "index.js").write_text(_script("SAELAB_INDEX", index), encoding="utf-8")
        vocab = {str(k): v for k, v in data.vocab.items()}
        (folder / "vocab.js").write_text(_script("SAELAB_VOCAB", vocab), encoding="utf-8")
        for k, start in enumerate(range(0, data.d_sae, latents_per_file)):
            stop = min(start + latents_per_file, data.d_sae)
            records = latent_records(data, range(start, stop))
            (folder / f"latents_{k}.js").write_text(_script("SAELAB_LATENTS", records, k), encoding="utf-8")
        for k, start in enumerate(range(0, data.context_ids.numel(), CONTEXTS_PER_FILE)):
            rows = data.context_tokens[start : start + CONTEXTS_PER_FILE].tolist()
            (folder / f"contexts_{k}.js").write_text(_script("SAELAB_CONTEXTS", rows, k), encoding="utf-8")
    return Path(out_dir).expanduser() / "index.html"


def make_server(out_dir: str | Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for `out_dir` bound to 127.0.0.1:<port> (0: any free port); not yet serving."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out_dir))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(out_dir: str | Path, port: int = 8000) -> None:
    """Serve `out_dir` on http://127.0.0.1:<port>/ until interrupted (Ctrl-C)."""
    with make_server(out_dir, port) as server:
        host, bound = server.server_address[:2]
        print(f"serving {out_dir} on http://{host}:{bound}/ (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
