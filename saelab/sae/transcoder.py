"""Transcoders: any saelab variant with a different target (Dunefsky, Chlenski, Nanda 2024; skip transcoders:
Paulo, Shabalin, Belrose 2025, "Transcoders Beat Sparse Autoencoders for Interpretability").

A transcoder encodes an input activation x [.., d_in] (e.g. an MLP's input) and decodes a prediction of another
activation y [.., d_out] (that MLP's output), trained on y's error; a skip transcoder adds a linear term:

    z = the variant's codes of x,     y_hat = z @ W_dec + b_dec (+ x @ W_skip^T),   W_dec [n, d_out], W_skip [d_out, d_in]

This module turns a variant class into its transcoder class without copying it: `Transcoder` is a mixin put in
front of the variant in the MRO, so the variant's selection, sparsity penalty, auxiliary losses, decoder norm
rule, learning rate, data-parallel statistics and checkpointing are unchanged. It changes only shapes, the
data and the files:

- Training rows are [x | y] (width d_in + d_out), so every row keeps its pair through buffers, caches,
  shuffling, resume and data-parallel sharding. `split_row` splits them; the variant's `training_forward` runs
  on x with `TrainContext.target` = y and `TrainContext.skip` = x @ W_skip^T (added to its decoder output).
- The encoder subtracts its own input bias `b_in` [d_in] (a buffer, the geometric median of the first batch's
  x) instead of b_dec, which lives in y's space. The trainer scales rows by sqrt(d_in) / mean ||x||; `b_in`
  and `target_scale` (a buffer, sqrt(d_out) / mean ||y|| of the first scaled batch, so y is at the norm the
  variant's penalties expect; `split_row` applies it, so in training space the transcoder predicts
  target_scale * y) are folded into the weights with the trainer's input scale (`fold_input_scale`): files
  hold SAELens's transcoder tensors W_enc, b_enc, W_dec, b_dec (, W_skip, threshold), raw x to raw y.
- Init: W_enc, b_enc and the variant's extra parameters as the variant initialises an SAE of width d_in; W_dec
  and b_dec as it initialises one of width d_out (independent draws). Then, from the first batch:
  b_dec = the geometric median of y - x @ W_skip^T; W_skip = 0 (`skip_init=zero`, as sparsify; the default) or
  the least-squares fit of y on x (`skip_init=lstsq`, ridge 1e-6); each decoder row whose latent fires on the
  batch points along codes_i^T r (r the residual y - x @ W_skip^T - b_dec): latent i's own least-squares
  decoder row, the transcoder's version of an SAE's tied init, where the decoder row is what the encoder reads;
  last the codes are scaled by the least-squares fit of r (TopK's encoder scaling). Against independent random
  rows this lowers the held-out FVU and raises the recovery of planted features (BENCHMARKS.md "Transcoders").

Names: `<variant>_transcoder` and `<variant>_skip_transcoder` for relu, topk, batchtopk, jumprelu, matryoshka and
gated. SAELens loads the saved files of relu ("transcoder", "skip_transcoder"), jumprelu, batchtopk and
matryoshka ("jumprelu_transcoder", "jumprelu_skip_transcoder": a threshold per latent). Matching pursuit and GBA
are refused (`TRANSCODER_REFUSALS`).

API: `encode(x)` -> codes, `decode(z)` -> z @ W_dec + b_dec (no skip term: it needs x), `forward(x)` -> y_hat
with the skip term, `predict(x, decoded)` adds the skip term to a decoding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field, make_dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.core.checks import check_number
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput, geometric_median
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.gated import GatedSAE
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.matryoshka import MatryoshkaSAE
from saelab.sae.registry import get_sae_class, refuse, register
from saelab.sae.relu import ReLUSAE
from saelab.sae.topk import TopKSAE

SKIP_INITS = ("lstsq", "zero")
#: Ridge added to x's covariance (times its mean eigenvalue) in the least-squares skip init.
SKIP_RIDGE = 1e-6
#: Variants that train as transcoders, and the SAELens architectures (without, with skip) their files load as.
TRANSCODABLE: dict[type[SAE], tuple[str | None, str | None]] = {
    ReLUSAE: ("transcoder", "skip_transcoder"),
    TopKSAE: (None, None),
    BatchTopKSAE: ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    JumpReLUSAE: ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    MatryoshkaSAE: ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    GatedSAE: (None, None),
}
#: Settings a variant's transcoders default to instead of its SAE's: on planted pairs the SAEs' L1 weight of 5
#: silenced nearly every latent of ReLU (L0 0.4) and gated (L0 0-2) transcoders; 1 kept them alive at L0 14-27
#: (BENCHMARKS.md "Transcoders"). A target-L0 controller, where the variant has one, makes this moot.
TRANSCODER_DEFAULTS: dict[type[SAE], dict[str, Any]] = {
    ReLUSAE: {"l1_coefficient": 1.0},
    GatedSAE: {"l1_coefficient": 1.0},
}
#: A transcoder's default Adam rate is this times its variant's: its decoder starts apart from the encoder and
#: has further to move. On planted pairs 3x lowered the held-out FVU of TopK, BatchTopK and ReLU transcoders and
#: raised the planted features recovered for all four variants measured (JumpReLU: sparser, FVU +0.03;
#: BENCHMARKS.md "Transcoders").
LR_FACTOR = 3.0
#: Variants SAELens's transcoder names are read as (batchtopk and matryoshka files read there as jumprelu).
SAELENS_READERS = (ReLUSAE, JumpReLUSAE)
#: Why the other variants have no transcoder.
TRANSCODER_REFUSALS = {
    "mp": (
        "matching pursuit encodes by subtracting the chosen atoms from the residual of the signal it rebuilds "
        "(its encoder is the decoder's transpose); a transcoder rebuilds y from x, two different spaces, so "
        "there is no residual of x to pursue. Train topk_transcoder (or another transcoder) instead."
    ),
    "gba": (
        "group bias adaptation ties each neuron's encoder and decoder to one direction w_m; a transcoder's "
        "encoder reads x and its decoder writes y, two different spaces with no shared direction. Train "
        "topk_transcoder (or another transcoder) instead."
    ),
}


class TranscoderConfigChecks:
    """validate() of every transcoder config (a dataclass made by `transcoder_config_class`)."""

    d_out: int
    skip_init: str

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        check_number(
            "sae.d_out", self.d_out, low=1, integer=True, hint="0 means from the source's target activation."
        )
        if self.skip_init not in SKIP_INITS:
            raise ValueError(f"sae.skip_init={self.skip_init!r} must be one of {list(SKIP_INITS)}.")


def transcoder_config_class(plain: type[SAE], name: str) -> type[SAEConfig]:
    """The variant's config dataclass plus d_out (0: from the source) and skip_init, architecture `name`."""
    fields = [
        *(
            (key, type(value), field(default=value))
            for key, value in TRANSCODER_DEFAULTS.get(plain, {}).items()
        ),
        ("architecture", str, field(default=name)),
        ("d_out", int, field(default=0)),
        ("skip_init", str, field(default="zero")),
    ]
    base = plain.config_class
    cls = make_dataclass(
        f"{base.__name__.removesuffix('Config')}{'Skip' if '_skip_' in name else ''}TranscoderConfig",
        fields,
        bases=(TranscoderConfigChecks, base),
    )
    cls.__doc__ = (
        f"{base.__doc__ or ''}\n\nTranscoder fields. d_out: the width of the target y (0: from the source). skip_init "
        "(skip transcoders): the linear skip's init, 'lstsq' (least-squares fit on the first batch) or 'zero'."
    )
    return cls


class Transcoder:
    """Mixin making a variant class (next in the MRO) a transcoder; see the module docstring."""

    is_transcoder: ClassVar[bool] = True
    #: The variant this transcoder is made of, and whether it has the linear skip term.
    plain_class: ClassVar[type[SAE]]
    has_skip: ClassVar[bool] = False
    cfg: Any
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    W_skip: Tensor
    b_in: Tensor
    target_scale: Tensor

    # ------------------------------------------------------------ shapes
    def create_parameters(self, dtype: torch.dtype) -> None:
        """The variant's parameters with W_dec [n, d_out], b_dec [d_out]; W_skip [d_out, d_in] with a skip; the
        buffers b_in [d_in] and target_scale [] (both folded into the saved files)."""
        super().create_parameters(dtype)  # type: ignore[misc]
        n, d_in, d_out = self.cfg.d_sae, self.cfg.d_in, self.cfg.d_out
        self.W_dec = nn.Parameter(torch.empty(n, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if self.has_skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype))
        self.register_buffer("b_in", torch.zeros(d_in, dtype=dtype))
        self.register_buffer("target_scale", torch.ones((), dtype=dtype))

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def row_width(self) -> int:
        """Training rows are [x | y]: d_in + d_out."""
        return self.cfg.d_in + self.cfg.d_out

    @property
    def input_bias(self) -> Tensor:
        return self.b_in

    def split_row(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Rows [B, d_in + d_out] -> (x [B, d_in], y [B, d_out] times target_scale, the units of the output)."""
        if rows.shape[-1] != self.row_width:
            raise ValueError(
                f"transcoder rows have width {rows.shape[-1]}, expected d_in + d_out = {self.cfg.d_in} + "
                f"{self.cfg.d_out}: a pair source yields [x | y] rows (source.target_hook, source=pairs)."
            )
        x, y = rows[..., : self.cfg.d_in], rows[..., self.cfg.d_in :]
        return x, y * self.target_scale.to(y.dtype)

    def plain_config(self, d_in: int) -> SAEConfig:
        """The variant's own config with this transcoder's settings and input width d_in."""
        names = [f.name for f in dataclasses.fields(self.plain_class.config_class)]
        values = {name: getattr(self.cfg, name) for name in names}
        return self.plain_class.config_class(
            **{**values, "architecture": self.plain_class.architecture, "d_in": d_in}
        )

    # ------------------------------------------------------------- init
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Encoder side as the variant initialises an SAE of width d_in, decoder side (W_dec, b_dec) as it
        initialises one of width d_out; W_skip and b_in zero, target_scale 1."""
        encoder = self.plain_class(self.plain_config(self.cfg.d_in), generator)
        decoder = self.plain_class(self.plain_config(self.cfg.d_out), generator)
        own = self.state_dict()  # type: ignore[attr-defined]
        with torch.no_grad():
            for name, value in encoder.state_dict().items():
                if name in own and name not in ("W_dec", "b_dec"):
                    own[name].copy_(value)
            self.W_dec.copy_(decoder.W_dec)
            self.b_dec.copy_(decoder.b_dec)
            if self.has_skip:
                self.W_skip.zero_()
            self.b_in.zero_()
            self.target_scale.fill_(1.0)

    @torch.no_grad()
    def initialize_from_sample(self, rows: Tensor) -> None:
        """From the first batch of rows [N, d_in + d_out] (x already scaled by the trainer): target_scale =
        sqrt(d_out) / mean ||y||, b_in = the geometric median of x, W_skip per skip_init, b_dec = the geometric
        median of y - x @ W_skip^T, decoder rows from the codes and the scale of the codes (module docstring)."""
        mean_norm = rows[:, self.cfg.d_in :].double().norm(dim=-1).mean().item()
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise ValueError(
                "cannot scale the transcoder's target: the first batch's y has zero or non-finite norm."
            )
        self.target_scale.fill_(math.sqrt(self.cfg.d_out) / mean_norm)
        x, y = self.split_row(rows)
        self.b_in.copy_(geometric_median(x).to(self.b_in.dtype))
        if self.has_skip:
            fit = least_squares_map(x, y) if self.cfg.skip_init == "lstsq" else torch.zeros_like(self.W_skip)
            self.W_skip.copy_(fit.to(self.W_skip.dtype))
        residual = y - self.skip_output(x)
        self.b_dec.copy_(geometric_median(residual).to(self.b_dec.dtype))
        residual = residual - self.b_dec
        codes = self.initial_codes(x)
        self.init_decoder_from_codes(codes, residual)
        self.scale_encoder_to_fit(residual + self.b_dec, codes @ self.W_dec)

    def initial_codes(self, x: Tensor) -> Tensor:
        """The codes [N, n] of x [N, d_in] that training starts from (the TopK family's training-time selection),
        as a sparse COO tensor for the TopK family (N * k entries), else dense."""
        if not hasattr(self, "select"):
            return self.encode_rows(x)
        values, indices = self.select(self.pre_activations(x), self.cfg.k)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(values.shape[1])
        where = torch.stack([rows, indices.reshape(-1)])
        return torch.sparse_coo_tensor(
            where, values.reshape(-1), (x.shape[0], self.cfg.d_sae), check_invariants=False
        ).coalesce()

    @torch.no_grad()
    def init_decoder_from_codes(self, codes: Tensor, residual: Tensor) -> None:
        """Each decoder row that the first batch's codes [N, n] use: the direction of codes[:, i]^T @ residual,
        the least-squares decoder row of latent i alone for the residual [N, d_out] the decoder must fit (row
        norms as the variant initialises them; rows of latents that never fired stay random)."""
        fitted = (codes.T @ residual.to(codes.dtype)).to(torch.float64)
        norms = fitted.norm(dim=1, keepdim=True)
        used = norms[:, 0] > 0
        rows = fitted / norms.clamp_min(1e-30) * self.W_dec.norm(dim=1, keepdim=True).double()
        self.W_dec.copy_(torch.where(used[:, None], rows, self.W_dec.double()).to(self.W_dec.dtype))

    # -------------------------------------------------------- inference
    def skip_output(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> the skip term x @ W_skip^T [..., d_out] (zeros without a skip)."""
        if not self.has_skip:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def predict(self, x: Tensor, decoded: Tensor) -> Tensor:
        """y_hat [..., d_out] from the input x [..., d_in] and the decoding of its codes [..., d_out]."""
        return decoded + self.skip_output(x) if self.has_skip else decoded

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """x [..., d_in] (cast to the transcoder's dtype) -> y_hat [..., d_out], skip term included."""
        rows = self.flat_input(x)  # type: ignore[attr-defined]
        decoded = super().reconstruct_rows(rows, **kwargs)  # type: ignore[misc]
        return self.predict(rows, decoded).reshape(*x.shape[:-1], self.cfg.d_out)

    # ---------------------------------------------------------- training
    def default_lr(self, batch_size: int) -> float:
        """LR_FACTOR times the variant's default rate (`trainer.lr` overrides it)."""
        return LR_FACTOR * super().default_lr(batch_size)  # type: ignore[misc]

    def training_forward(self, rows: Tensor, ctx: TrainContext) -> TrainOutput:
        """One training pass on rows [B, d_in + d_out]: the variant's own pass on x, its loss on y."""
        x, y = self.split_row(rows)
        skip = x @ self.W_skip.T if self.has_skip else None
        return super().training_forward(x, dataclasses.replace(ctx, target=y, skip=skip))  # type: ignore[misc]

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Take raw rows when trained on scale * rows: x is read at scale, y predicted at scale * target_scale,
        which then becomes 1."""
        out = scale * float(self.target_scale)
        self.W_enc.mul_(scale)
        self.b_in.div_(scale)
        self.W_dec.div_(out)
        self.b_dec.div_(out)
        if self.has_skip:
            self.W_skip.div_(float(self.target_scale))
        self.target_scale.fill_(1.0)

    # ------------------------------------------------------------- files
    def file_tensors(self) -> dict[str, Tensor]:
        """The variant's tensors with b_in folded into the encoder biases: SAELens's transcoder layout (x @ W_enc
        + b_enc, no input centring) computing the same function. target_scale is not saved: saved transcoders have
        it folded in (`fold_input_scale`; checkpoints keep it in their training weights)."""
        tensors = super().file_tensors()  # type: ignore[misc]
        b_in = tensors.pop("b_in")
        tensors.pop("target_scale")
        dtype = self.W_enc.dtype
        self.plain_class.absorb_input_offset(tensors, -b_in)
        return {name: value.to(dtype).contiguous() for name, value in tensors.items()}

    @classmethod
    def from_file_tensors(cls, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """The variant's inverse, plus b_in = 0 and target_scale = 1 for files (training weights keep theirs)."""
        tensors = super().from_file_tensors(tensors, where)  # type: ignore[misc]
        if "W_enc" not in tensors or "b_in" in tensors:
            return tensors
        w = tensors["W_enc"]
        return {**tensors, "b_in": w.new_zeros(w.shape[0]), "target_scale": w.new_ones(())}

    def config_dict(self) -> dict[str, Any]:
        """The variant's config; apply_b_dec_to_input is false (files hold no input centring: SAELens requires it
        for transcoders)."""
        out = super().config_dict()  # type: ignore[misc]
        out["apply_b_dec_to_input"] = False
        return out


class NestedTranscoder:
    """Mixin of the Matryoshka transcoders (before `Transcoder` in the MRO): `prefix` keeps the transcoder's own
    tensors."""

    @torch.no_grad()
    def prefix(self, groups: int) -> SAE:
        """The nested transcoder of the first `groups` groups (`MatryoshkaSAE.prefix`, with b_in, target_scale
        and the skip term)."""
        small = super().prefix(groups)  # type: ignore[misc]
        for name in ("b_in", "target_scale", *(("W_skip",) if self.has_skip else ())):  # type: ignore[attr-defined]
            getattr(small, name).copy_(getattr(self, name))
        return small


def least_squares_map(x: Tensor, y: Tensor) -> Tensor:
    """W [d_out, d_in] minimising ||(y - mean y) - (x - mean x) @ W^T||^2 over rows x [N, d_in], y [N, d_out]
    (float64, ridge SKIP_RIDGE times the mean eigenvalue of x's covariance)."""
    xc = x.double() - x.double().mean(dim=0)
    yc = y.double() - y.double().mean(dim=0)
    gram = xc.T @ xc
    ridge = SKIP_RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, xc.T @ yc).T


def make_transcoder(plain: type[SAE], skip: bool) -> type[SAE]:
    """Register and return the transcoder class of variant `plain` (`<name>_transcoder` / `<name>_skip_transcoder`)."""
    name = f"{plain.architecture}{'_skip' if skip else ''}_transcoder"
    saelens = TRANSCODABLE[plain][skip]
    attrs = {
        "__module__": __name__,
        "__doc__": f"{plain.__name__} as a {'skip ' if skip else ''}transcoder (saelab.sae.transcoder).",
        "config_class": transcoder_config_class(plain, name),
        "plain_class": plain,
        "has_skip": skip,
        "saelens_architecture": saelens,
        "saelens_reads": (saelens,) if saelens and plain in SAELENS_READERS else (),
        "dictionary_learning_class": None,
        "dictionary_learning_trainer": None,
        "dictionary_learning_reads": (),
        "required_fields": (*plain.required_fields, "d_out"),
    }
    mixins = (NestedTranscoder, Transcoder) if hasattr(plain, "prefix") else (Transcoder,)
    cls = type(
        f"{plain.__name__.removesuffix('SAE')}{'Skip' if skip else ''}Transcoder", (*mixins, plain), attrs
    )
    globals()[cls.__name__] = cls
    globals()[cls.config_class.__name__] = cls.config_class
    cls.config_class.__module__ = __name__
    return register(name)(cls)


def transcoder_class(architecture: str, skip: bool = False) -> type[SAE]:
    """The transcoder class of the variant named `architecture` (raises naming why for those without one)."""
    return get_sae_class(f"{architecture}{'_skip' if skip else ''}_transcoder")


def resolve_for_data(cfg: SAEConfig, d_in: int, d_out: int | None) -> SAEConfig:
    """cfg with d_in / d_sae (and a transcoder's d_out) filled in from a source of width d_in whose rows carry a
    target of width d_out (None: single activations); an SAE on pairs or a transcoder without them is refused."""
    transcoder = get_sae_class(cfg.architecture).is_transcoder
    if transcoder and d_out is None:
        raise ValueError(
            f"sae.architecture={cfg.architecture!r} is a transcoder: it trains on (input, target) pairs, but the "
            "source yields single activations. Set source.target_hook=<hook> (source=model / smollm2 / cache; "
            "with source.backend=hf leave it empty to pair a module's input with its output) or use source=pairs."
        )
    if not transcoder and d_out is not None:
        raise ValueError(
            f"the source yields (input, target) pairs but sae.architecture={cfg.architecture!r} is an SAE of one "
            f"activation; train sae={cfg.architecture}_transcoder (or clear source.target_hook)."
        )
    resolved = cfg.resolved(d_in)
    if not transcoder:
        return resolved
    if resolved.d_out not in (0, d_out):  # type: ignore[attr-defined]
        raise ValueError(
            f"sae.d_out={resolved.d_out} but the source's target activations have width {d_out}; set "  # type: ignore[attr-defined]
            f"sae.d_out={d_out} (or 0 to infer it)."
        )
    return dataclasses.replace(resolved, d_out=d_out)


for _plain in TRANSCODABLE:
    for _skip in (False, True):
        make_transcoder(_plain, _skip)
for _name, _reason in TRANSCODER_REFUSALS.items():
    refuse(f"{_name}_transcoder", _reason)
    refuse(f"{_name}_skip_transcoder", _reason)
del _plain, _skip, _name, _reason
