"""PNG plots for the evaluation report (matplotlib, headless Agg backend); each file is written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from saelab.core.atomic import atomic_file  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_density_histogram(histogram: dict, path: str | Path) -> Path:
    """Bar chart of a `log10_density_histogram` dict; never-fired latents are noted in the title."""
    edges, counts = histogram["edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="white")
    ax.set_xlabel("log10(firing density)")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent density ({histogram['never_fired']} never fired)")
    return _save(fig, Path(path))


def plot_spectrum(
    eigenvalues: Tensor, slope: float, path: str | Path, ranks: tuple[int, int] = (10, 150)
) -> Path:
    """Log-log eigen-spectrum of cov(W_dec) with the fitted power-law slope over `ranks` marked."""
    eig = eigenvalues.double().cpu()
    positive = eig > 0
    ranks_all = torch.arange(1, eig.numel() + 1)[positive]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.loglog(ranks_all.numpy(), eig[positive].numpy(), color="tab:blue")
    ax.axvspan(ranks[0], min(ranks[1], eig.numel()), color="tab:orange", alpha=0.15, label="fit range")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue of cov(W_dec)")
    ax.set_title(f"Decoder spectrum (slope {slope:.3f})")
    ax.legend()
    return _save(fig, Path(path))


def plot_cosine_histogram(max_cos: Tensor, path: str | Path, bins: int = 50) -> Path:
    """Histogram of each latent's maximum cosine to another decoder row."""
    values = max_cos.double().cpu()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values.numpy(), bins=bins, range=(min(0.0, values.min().item()), 1.0), color="tab:green")
    ax.set_xlabel("max cosine to another latent")
    ax.set_ylabel("latents")
    ax.set_title("Decoder nearest-neighbour cosine")
    return _save(fig, Path(path))
