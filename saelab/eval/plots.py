"""PNG plots for the evaluation report (matplotlib, headless Agg backend); each file is written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

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


def plot_frontier(points: list[dict], path: str | Path, metric: str, label: str, front: set[int]) -> Path:
    """L0 (log x when it spans a decade) against `metric` for points [{"name", "l0", metric, "kind"}]; the Pareto front joined and
    ringed; baselines ("kind": "baseline") drawn as grey crosses."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    runs = [(i, p) for i, p in enumerate(points) if p.get(metric) is not None and p.get("l0")]
    for i, p in runs:
        baseline = p.get("kind") == "baseline"
        ax.scatter(
            p["l0"], p[metric], marker="x" if baseline else "o", s=40,
            color="grey" if baseline else ("tab:red" if i in front else "tab:blue"), zorder=3,
        )  # fmt: skip
        ax.annotate(p["name"], (p["l0"], p[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    on_front = sorted((p["l0"], p[metric]) for i, p in runs if i in front)
    if len(on_front) > 1:
        ax.plot(*zip(*on_front, strict=True), color="tab:red", lw=1, label="Pareto front")
        ax.legend()
    l0s = [p["l0"] for _, p in runs]
    if l0s and max(l0s) > 10 * min(l0s):  # a log axis only where L0 spans a decade
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(label)
    ax.set_title(f"L0 vs {label}")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_absorption_letters(section: dict, path: str | Path) -> Path:
    """Per letter: the SAE's mean absorption fraction and full-absorption rate, baselines' fractions as markers."""
    details = section["eval_result_details"]
    letters = [d["first_letter"] for d in details]
    x = torch.arange(len(letters)).numpy()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(x - 0.2, [d["mean_absorption_fraction"] for d in details], 0.4, label="absorption fraction")
    ax.bar(x + 0.2, [d["full_absorption_rate"] for d in details], 0.4, label="full absorption rate")
    for marker, (name, result) in zip("v^sD", section.get("baselines", {}).items(), strict=False):
        rows = {d["first_letter"]: d for d in result.get("eval_result_details", [])}
        ys = [
            rows[letter]["mean_absorption_fraction"] if letter in rows else float("nan") for letter in letters
        ]
        ax.scatter(x, ys, marker=marker, color="grey", s=18, zorder=3, label=f"{name} (fraction)")
    ax.set_xticks(x, letters)
    ax.set_ylabel("share of detected words")
    ax.set_title("Feature absorption per first letter")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_probing_vs_k(section: dict, path: str | Path) -> Path:
    """Mean test accuracy against k: the SAE, the model's own dimensions, and each baseline."""
    metrics = section["eval_result_metrics"]
    ks = sorted(int(key.split("_")[2]) for key in metrics["sae"] if key.startswith("sae_top_"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ks, [metrics["sae"][f"sae_top_{k}_test_accuracy"] for k in ks], "o-", label="SAE latents")
    ax.plot(ks, [metrics["llm"][f"llm_top_{k}_test_accuracy"] for k in ks], "s--", label="model dimensions")
    for name, result in section.get("baselines", {}).items():
        if result.get("same_codes_as_sae"):
            continue
        values = result["eval_result_metrics"]["sae"]
        ax.plot(ks, [values[f"sae_top_{k}_test_accuracy"] for k in ks], "x:", color="grey", label=name)
    if "llm_test_accuracy" in metrics["llm"]:
        ax.axhline(
            metrics["llm"]["llm_test_accuracy"], color="tab:green", lw=1, label="model, all dimensions"
        )
    ax.axhline(0.5, color="black", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (latents / dimensions)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Sparse probing")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))
