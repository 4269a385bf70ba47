"""Brute-force references and a headless-browser driver for the `saelab inspect` tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import torch

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",
]  # fmt: skip


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


def chromium(url: str, user_dir: Path, *extra: str) -> str:
    """Run headless Chromium on `url`; returns stdout (the DOM with --dump-dom)."""
    out = subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *extra, url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


class DomParser(HTMLParser):
    """Collects index rows (tr[data-latent]), the panel's latent and its examples (div.example) by section."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []
        self.panel: str | None = None
        self.examples: dict[str, list[dict[str, str]]] = {"top": [], "samples": []}
        self.section: str | None = None
        self.count_text = ""
        self._in_count = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-latent" in a:
            self.rows.append(int(a["data-latent"]))
        if tag == "section" and a.get("id") == "panel":
            self.panel = a.get("data-latent")
        if tag == "div" and a.get("id") in ("top", "samples"):
            self.section = a["id"]
        if tag == "div" and "example" in a.get("class", "").split() and self.section:
            self.examples[self.section].append(a)
        self._in_count = tag == "span" and a.get("id") == "count"

    def handle_data(self, data):
        if self._in_count:
            self.count_text += data


def parse_dom(html: str) -> DomParser:
    parser = DomParser()
    parser.feed(html)
    return parser


def is_png(path: Path) -> tuple[int, int] | None:
    """(width, height) of a PNG file, None if it is not one."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def chromium_or_skip() -> None:
    import pytest

    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install -y chromium`).")


def count_of(text: str) -> int:
    match = re.match(r"(\d+) of (\d+) latents", text)
    assert match, text
    return int(match.group(1))
