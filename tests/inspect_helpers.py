"""Brute-force references, the planted model, and a headless-browser driver for the `saelab inspect` tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from harvest_helpers import WORDS, tiny_tl

from saelab.sae.relu import ReLUConfig, ReLUSAE

HOOK = "blocks.0.hook_resid_pre"  # embedding + positional embedding: a token's direction is known exactly
T = 16
BOS, PAD = 0, 1
SPECIAL = [0, 1, 2]
PLANTED_TOKEN = 3 + WORDS.index("w7")
PLANTED_LATENT = 7
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def token_contexts(n_ctx: int, seed: int) -> torch.Tensor:
    """[n_ctx, T] word ids with BOS first and ~5% pad tokens inside (both excluded from the statistics)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 3 + len(WORDS), (n_ctx, T), generator=gen)
    tokens[torch.rand(n_ctx, T, generator=gen) < 0.05] = PAD
    tokens[:, 0] = BOS
    return tokens


def hook_acts(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own activations at HOOK, flattened: [n_ctx * T, d]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK].reshape(-1, cache[HOOK].shape[-1])


def keep_of(tokens: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(tokens, torch.tensor(SPECIAL)).reshape(-1)


def planted_model_and_sae(tokenizer_dir: Path, d_sae: int = 48):
    """A 1-layer TransformerLens model whose w7 embedding is long, and a ReLU SAE whose latent 7 reads that
    direction (it fires on w7 and nowhere else); latents 8-11 never fire."""
    model = tiny_tl(n_layers=1, tokenizer_dir=tokenizer_dir)
    with torch.no_grad():
        model.W_E[PLANTED_TOKEN] *= 4
    torch.manual_seed(3)
    sae = ReLUSAE(ReLUConfig(d_in=32, d_sae=d_sae)).eval()
    with torch.no_grad():
        sae.b_dec.zero_()
        e = model.W_E[PLANTED_TOKEN].detach()
        sae.W_enc[:, PLANTED_LATENT] = e / e.dot(e)  # 1 + pos_embed . e / |e|^2 at w7, about 0 elsewhere
        sae.b_enc[PLANTED_LATENT] = -0.5
        sae.b_enc[8:12] = -1e3
    return model, sae


def dense_relu_codes(x: torch.Tensor, sae) -> torch.Tensor:
    """ReLU SAE codes from the formula, in float64: relu((x - b_dec) @ W_enc + b_enc). x [N, d] -> [N, n]."""
    W_enc, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    return torch.relu((x.double() - b_dec) @ W_enc + b_enc)


def topk_codes(x: torch.Tensor, sae, k: int) -> torch.Tensor:
    """TopK SAE codes from the formula, in float64: keep the k largest pre-activations, then ReLU."""
    W_enc, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x.double() - b_dec) @ W_enc + b_enc
    top = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())


def is_png(path: Path) -> tuple[int, int] | None:
    """(width, height) of a PNG file, None if it is not one."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@contextmanager
def chromium_browser() -> Iterator:
    """A headless Debian chromium driven by Playwright (PyPI `playwright`, never its own browser download);
    skips the test, naming why, when either is missing."""
    import pytest

    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install -y chromium`).")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the dev extra's playwright is not installed"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()
