"""Random baselines built from the SAE under evaluation, scored beside it (after Korznikov et al. 2026, "Sanity
Checks for Sparse Autoencoders: Do SAEs Beat Random Baselines?").

- random_decoder: the SAE's own encoder (same codes), each decoder row replaced by a random direction of the
  same norm. Codes-only metrics (sparse probing) are the SAE's by construction; decoder-based ones
  (absorption, reconstruction) show what the learned decoder adds.
- random_directions: a TopK SAE over random unit directions (tied: encoder = decoder transpose) keeping
  round(L0) latents per row, L0 being the SAE's on the sample; b_dec is the SAE's, the codes scaled to fit
  the sample (least squares). The same sparsity with nothing learned.
- init: the SAE's own variant and shape at saelab's initialisation (random tied unit directions, then its
  data-dependent init on the sample: b_dec = geometric median, encoder scale; inputs normalised as the
  trainer does, the scale folded in; a BatchTopK-style inference threshold as its first training batch would
  set it), i.e. the SAE before training.

Every random draw comes from its own stream of the eval seed (`saelab.core.seeds`).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from saelab.core.seeds import generator
from saelab.eval.config import BASELINES
from saelab.metrics.codes import decode_codes, encode_codes, l0_per_row
from saelab.sae.base import SAE
from saelab.sae.registry import build_sae
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.train.trainer import norm_scale

#: Baselines whose codes are the SAE's (they keep its encoder): codes-only metrics need not run on them.
SAME_CODES = frozenset({"random_decoder"})


def random_unit_rows(n: int, d: int, gen: torch.Generator) -> Tensor:
    """[n, d] float32 rows drawn uniformly on the unit sphere."""
    w = torch.randn(n, d, generator=gen, dtype=torch.float32)
    return w / w.norm(dim=1, keepdim=True)


@torch.no_grad()
def mean_l0(sae: SAE, x: Tensor) -> float:
    """Mean active latents per row of x [N, d_in]."""
    return float(l0_per_row(encode_codes(sae, x.to(sae.W_dec.device, sae.dtype))).mean())


@torch.no_grad()
def random_decoder(sae: SAE, seed: int) -> SAE:
    """The SAE with every decoder row turned to a random direction (norms kept)."""
    out = copy.deepcopy(sae).eval()
    rows = random_unit_rows(sae.d_sae, sae.d_in, generator(seed, "eval.baseline.random_decoder"))
    out.W_dec.copy_(rows.to(out.W_dec) * sae.W_dec.norm(dim=1, keepdim=True))
    return out


@torch.no_grad()
def random_directions(sae: SAE, sample: Tensor, seed: int) -> SAE:
    """Tied random unit directions with TopK at the SAE's L0 on `sample` [N, d_in] (at least 1)."""
    k = max(1, round(mean_l0(sae, sample)))
    out = TopKSAE(TopKConfig(d_in=sae.d_in, d_sae=sae.d_sae, k=min(k, sae.d_sae)), torch.Generator())
    rows = random_unit_rows(sae.d_sae, sae.d_in, generator(seed, "eval.baseline.random_directions"))
    out.W_dec.copy_(rows)
    out.W_enc.copy_(rows.T)
    out.b_dec.copy_(sae.b_dec.detach().float().cpu())
    out = out.to(sae.W_dec.device).eval()
    x = sample.to(sae.W_dec.device, out.dtype)
    values, indices = out.encode_sparse(x)
    out.scale_encoder_to_fit(x, out.decode_sparse(values, indices, with_bias=False))
    return out


@torch.no_grad()
def at_initialisation(sae: SAE, sample: Tensor, seed: int) -> SAE:
    """The SAE's variant and shape as saelab initialises it for training on `sample` [N, d_in]."""
    cfg = dataclasses.replace(sae.cfg, metadata={})
    out = build_sae(cfg, generator(seed, "eval.baseline.init")).to(sae.W_dec.device)
    x = sample.to(sae.W_dec.device, out.dtype)
    scale = norm_scale(x)
    out.initialize_from_sample(x * scale)
    threshold = getattr(out, "threshold", None)
    if isinstance(threshold, Tensor) and bool(threshold.isnan().any()) and hasattr(out, "update_threshold"):
        values, _ = out.select(
            out.pre_activations(x * scale), out.cfg.k
        )  # as its first training batch sets it
        out.update_threshold(values)
    out.fold_input_scale(scale)
    return out.eval()


def build_baselines(sae: SAE, sample: Tensor, names: list[str], seed: int) -> dict[str, SAE]:
    """{name: baseline SAE} for the names in BASELINES; sample [N, d_in]: activations of the SAE's hook."""
    builders = {
        "random_decoder": lambda: random_decoder(sae, seed),
        "random_directions": lambda: random_directions(sae, sample, seed),
        "init": lambda: at_initialisation(sae, sample, seed),
    }
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose among {list(BASELINES)}.")
    return {name: builders[name]() for name in names}


@torch.no_grad()
def reconstruct(sae: SAE, x: Tensor) -> tuple[Tensor, object]:
    """(x_hat [N, d_in], codes) of x [N, d_in] through `sae`."""
    codes = encode_codes(sae, x.to(sae.W_dec.device, sae.dtype))
    return decode_codes(sae, codes), codes
