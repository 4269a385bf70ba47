"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"), as SAEBench's
`absorption_first_letter` computes it, on the cached activations of `saelab.eval.first_letter`.

1. Letter probes (`train_letter_probes`, once per model and hook): one-vs-rest logistic probes on the
   activations; the probe of a letter scores its test words (F1 at logit > 0).
2. Aligned ("split") latents (`split_latents`): an L1-penalised one-vs-rest probe on the SAE's codes of the
   training words ranks the latents per letter (largest weights); for k = 1..max_k a balanced logistic probe
   on the top k latents is scored by test F1, and the top-k set grows while each k gains at least
   f1_jump_threshold.
3. Per test word of the letter that its probe detects (logit > 0), with p the unit probe direction, x the
   activation, z its codes and c_j = cos(W_dec[j], p) (`word_absorption`):
     proj = x . p;  main = sum_{j in split} z_j c_j;
     absorbers: the max_absorbing_latents largest z_j c_j > 0 over latents j outside the split with
     c_j >= absorption_fraction_probe_cos; T = their sum;
     absorption fraction = 0 if main >= proj or T / proj < probe_projection_proportion, else 1 if main <= 0,
       else A / (A + main) with A = min(T, proj - main);
     full absorption = every split latent silent, the latent with the largest z_j c_j has
       c_j >= full_absorption_probe_cos, proj >= 0, and its z_j c_j / proj >= probe_projection_proportion.
4. Per letter: the mean absorption fraction and the full-absorption rate over those words, and the number
   of split latents; overall: their means (and sample standard deviations) over the letters whose probe F1
   exceeds min_probe_f1.

One difference from SAEBench: step 3 reuses the test words' activations of step 1 (one model pass for the
whole metric); SAEBench runs the model again on the same words with freshly drawn in-context examples.
"""

from __future__ import annotations

import statistics
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from saelab.eval.config import AbsorptionConfig
from saelab.eval.first_letter import LETTERS, FirstLetterData
from saelab.eval.logistic import LinearProbe, f1_score, fit_l1_logistic_ovr, fit_logistic, fit_logistic_ovr
from saelab.metrics.codes import encode_codes, to_dense
from saelab.sae.base import SAE

EPS = 1e-8
EVAL_TYPE_ID = "absorption_first_letter"


def train_letter_probes(data: FirstLetterData, l2: float) -> LinearProbe:
    """One-vs-rest probes weight [26, d], bias [26] on the training words' activations."""
    x, y = data.split(train=True)
    return fit_logistic_ovr(x, F.one_hot(y, len(LETTERS)), l2=l2)


def letter_probe_f1(probe: LinearProbe, data: FirstLetterData) -> list[float]:
    """Test F1 of each letter's probe (prediction: logit > 0)."""
    x, y = data.split(train=False)
    logits = probe.logits(x)
    return [f1_score(logits[:, c] > 0, y == c) for c in range(len(LETTERS))]


@torch.no_grad()
def sparse_codes(sae: SAE, x: Tensor, batch_size: int = 4096) -> Tensor:
    """The SAE's codes of x [N, d] as a sparse CSR [N, n] float32 tensor on the CPU."""
    parts = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(sae.W_dec.device, sae.dtype)
        parts.append(to_dense(encode_codes(sae, xb), sae.d_sae).float().cpu().to_sparse_coo())
    with warnings.catch_warnings():  # torch calls its CSR layout "beta"; the products used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.cat(parts).coalesce().to_sparse_csr()


def k_sparse_f1(
    codes_train: Tensor, y_train: Tensor, codes_test: Tensor, y_test: Tensor, cfg: AbsorptionConfig
) -> tuple[list[list[float]], list[list[list[int]]]]:
    """(f1[letter][k-1], latents[letter][k-1]) of the k-sparse probes, k = 1..max_k_value (see step 2)."""
    n_letters = len(LETTERS)
    ranking = fit_l1_logistic_ovr(codes_train, F.one_hot(y_train, n_letters), l1=cfg.k_sparse_probe_l1_decay)
    dense_train, dense_test = codes_train.to_dense(), codes_test.to_dense()
    f1s: list[list[float]] = []
    latents: list[list[list[int]]] = []
    top = ranking.weight.topk(min(cfg.max_k_value, ranking.weight.shape[1]), dim=1).indices
    for c in range(n_letters):
        f1s.append([])
        latents.append([])
        pos_train, pos_test = y_train == c, y_test == c
        for k in range(1, top.shape[1] + 1):
            feats = top[c, :k]
            if pos_train.all() or not pos_train.any():
                f1 = 0.0
            else:
                probe = fit_logistic(dense_train[:, feats], pos_train, C=1.0, balanced=True)
                f1 = f1_score(probe.logits(dense_test[:, feats]) > 0, pos_test)
            f1s[-1].append(f1)
            latents[-1].append(feats.tolist())
    return f1s, latents


def split_latents(f1s: list[float], latents: list[list[int]], jump: float) -> list[int]:
    """The top-k latents for the largest k reached while every step from k - 1 gained at least `jump` F1
    (k = 1 always counts)."""
    best, chosen = -100.0, []
    for f1, feats in zip(f1s, latents, strict=True):
        if f1 <= best + jump:
            break
        best, chosen = f1, feats
    return chosen


def word_absorption(
    x: Tensor, z: Tensor, probe_direction: Tensor, W_dec: Tensor, main: list[int], cfg: AbsorptionConfig
) -> tuple[Tensor, Tensor]:
    """Absorption fraction [M] float64 and full absorption [M] bool of words x [M, d] with dense codes
    z [M, n] (step 3 of the module docstring). probe_direction [d]; W_dec [n, d]; main: the split latents."""
    p = probe_direction.double() / probe_direction.double().norm()
    cos = F.cosine_similarity(W_dec.detach().double().cpu(), p[None, :], dim=1)  # [n]
    z = z.double()
    proj = x.double() @ p  # [M]
    latent_proj = z * cos  # [M, n]
    main_idx = torch.tensor(main, dtype=torch.long)
    main_proj = latent_proj[:, main_idx].sum(dim=1)
    candidate = (cos >= cfg.absorption_fraction_probe_cos)[None, :] & (latent_proj > 0)
    candidate[:, main_idx] = False
    masked = torch.where(candidate, latent_proj, torch.zeros_like(latent_proj))
    n_top = min(cfg.max_absorbing_latents, masked.shape[1])
    absorbed = masked.topk(n_top, dim=1).values.sum(dim=1)  # zeros where fewer candidates: they add nothing
    share = absorbed / proj
    partial = (absorbed.minimum(proj - main_proj)) / (absorbed.minimum(proj - main_proj) + main_proj)
    fraction = torch.where(
        (main_proj >= proj) | (share < cfg.probe_projection_proportion),
        torch.zeros_like(proj),
        torch.where(main_proj <= 0, torch.ones_like(proj), partial.clamp(0.0, 1.0)),
    )
    top_value, top_latent = latent_proj.max(dim=1)
    full = (
        (z[:, main_idx] < EPS).all(dim=1)
        & (cos[top_latent] >= cfg.full_absorption_probe_cos)
        & (proj >= 0)
        & (top_value / proj >= cfg.probe_projection_proportion)
    )
    return fraction, full


def absorption_metrics(
    sae: SAE, data: FirstLetterData, probe: LinearProbe, probe_f1: list[float], cfg: AbsorptionConfig
) -> dict[str, Any]:
    """SAEBench's result sections for one SAE: `eval_result_metrics` ({"mean": ...}) and
    `eval_result_details` (one row per scored letter), or `skipped` with the reason."""
    x_train, y_train = data.split(train=True)
    x_test, y_test = data.split(train=False)
    codes_train, codes_test = sparse_codes(sae, x_train), sparse_codes(sae, x_test)
    f1s, latents = k_sparse_f1(codes_train, y_train, codes_test, y_test, cfg)
    detected = probe.logits(x_test) > 0  # [M, 26]
    details = []
    for c, letter in enumerate(LETTERS):
        if probe_f1[c] <= cfg.min_probe_f1:
            continue
        main = split_latents(f1s[c], latents[c], cfg.f1_jump_threshold)
        rows = (y_test == c) & detected[:, c]
        n_true = int(rows.sum())
        if n_true == 0:
            continue
        z = codes_test.to_dense()[rows]
        fraction, full = word_absorption(x_test[rows], z, probe.weight[c], sae.W_dec, main, cfg)
        details.append(
            {
                "first_letter": letter,
                "mean_absorption_fraction": float(fraction.sum()) / n_true,
                "full_absorption_rate": float(full.sum()) / n_true,
                "num_full_absorption": int(full.sum()),
                "num_probe_true_positives": n_true,
                "num_split_features": len(main),
                "split_features": main,
                "split_feature_f1": f1s[c][len(main) - 1],
            }
        )
    if len(details) < cfg.min_letters:
        return {
            "skipped": f"only {len(details)} letters have a probe with test F1 > {cfg.min_probe_f1} "
            f"(eval.absorption.min_letters={cfg.min_letters}): the model does not represent first letters at "
            "this hook well enough for the metric."
        }
    return {"eval_result_metrics": {"mean": _means(details)}, "eval_result_details": details}


def _means(details: list[dict[str, Any]]) -> dict[str, float]:
    def column(name: str) -> list[float]:
        return [float(d[name]) for d in details]

    def stdev(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    fraction, full, split = (
        column("mean_absorption_fraction"),
        column("full_absorption_rate"),
        column("num_split_features"),
    )
    return {
        "mean_absorption_fraction_score": statistics.mean(fraction),
        "mean_full_absorption_score": statistics.mean(full),
        "mean_num_split_features": statistics.mean(split),
        "std_dev_absorption_fraction_score": stdev(fraction),
        "std_dev_full_absorption_score": stdev(full),
        "std_dev_num_split_features": stdev(split),
        "mean_split_feature_f1": statistics.mean(column("split_feature_f1")),
    }
