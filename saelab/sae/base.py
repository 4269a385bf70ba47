"""The SAE base class: parameters, encode/decode, the training hooks every variant fills in, save/load.

Row-vector convention throughout: x [B, d_in], W_enc [d_in, n], W_dec [n, d_in],
pre = (x - b_dec) @ W_enc + b_enc, x_hat = z @ W_dec + b_dec.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.core.atomic import atomic_directory
from saelab.core.checks import check_flags, check_number

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
#: cfg.json follows SAELens >= 6's layout; SAELens reads a config's nested `metadata` only when it says so.
SAELENS_LAYOUT_VERSION = "6.0.0"


@dataclass
class SAEConfig:
    """Fields shared by every variant. `d_in=0` / `d_sae=0` mean "fill in from the data" before build.

    architecture: the registered variant name (`sae=<name>`). d_in: width of the input activations (0: from the
    source). d_sae: number of latents (0: expansion_factor * d_in). expansion_factor: latents per input
    dimension when d_sae is 0. dtype: the weights' dtype (`float16` is refused for training:
    train in float32 and load with `load_sae(..., dtype="float16")`). metadata: provenance saved in cfg.json (model_name, hook_name, training tokens, final metrics, ...).
    """

    architecture: str = "topk"
    d_in: int = 0
    d_sae: int = 0
    expansion_factor: int = 16
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)

    def resolved(self, d_in: int) -> SAEConfig:
        """Return a copy with d_in / d_sae filled in; raises if an explicit d_in disagrees with the data."""
        if self.d_in not in (0, d_in):
            raise ValueError(
                f"sae.d_in={self.d_in} but the activation source yields vectors of size {d_in}; "
                f"set sae.d_in={d_in} (or 0 to infer it)."
            )
        d_sae = self.d_sae or self.expansion_factor * d_in
        return dataclasses.replace(self, d_in=d_in, d_sae=d_sae)

    def validate(self) -> None:
        """Raise ValueError naming the field for any inconsistent value."""
        for name in ("expansion_factor", "d_in", "d_sae"):  # d_sae comes from expansion_factor when unset
            check_number(f"sae.{name}", getattr(self, name), low=1, integer=True)
        check_flags(self, "sae")
        if self.dtype not in DTYPES:
            raise ValueError(f"sae.dtype={self.dtype!r} is not one of {sorted(DTYPES)}.")


DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class TrainContext:
    """What the trainer tells the SAE each step.

    dead_mask: [n] bool, latents that have not fired within the dead window.
    any_dead: host-side flag refreshed periodically, so a step with no dead latents skips auxiliary work
    without a device sync.
    dead_latents: optional [C] int64, the latents dead at that refresh padded with n (`kernels.auxk.
    dead_latent_list`), so that AuxK can gather the dead sub-dictionary without a device sync.
    lr_scale: the learning-rate schedule's factor at this step (0 to 1; `saelab.sae.target_l0` follows it).
    """

    step: int
    total_steps: int
    dead_mask: Tensor
    any_dead: bool
    dead_latents: Tensor | None = None
    lr_scale: float = 1.0
    #: Transcoders (`saelab.sae.transcoder`): the target y [B, d_out] the output must match (None: the input x,
    #: an SAE), and the skip term x @ W_skip^T [B, d_out] added to the decoder's output (None: no skip).
    target: Tensor | None = None
    skip: Tensor | None = None

    def target_for(self, x: Tensor) -> Tensor:
        """What the output of input x [B, d_in] must reconstruct: the target y, else x itself."""
        return x if self.target is None else self.target

    def output(self, decoded: Tensor) -> Tensor:
        """The prediction from the decoder's output [..., B, d_out] (b_dec included): plus the skip term, if any."""
        return decoded if self.skip is None else decoded + self.skip


@dataclass
class TrainOutput:
    """One training forward pass.

    loss: scalar to minimise. x_hat: [B, d_in]. fired: [n] bool, latents active on any row of the batch.
    l0: scalar, mean active latents per row. metrics: scalar tensors to log (fvu, auxk, l1, ...).
    inference_fired: [n] bool, latents the inference encoder (what a saved SAE computes) fires on for the batch,
    for variants whose training selection differs from it (BatchTopK's threshold); None: the same as `fired`.
    """

    loss: Tensor
    x_hat: Tensor
    fired: Tensor
    l0: Tensor
    metrics: dict[str, Tensor]
    inference_fired: Tensor | None = None


class SAE(nn.Module):
    """Base sparse autoencoder. Subclasses set `config_class` and implement `encode_rows` and `training_forward`;
    `encode` and `forward` accept [..., d_in] inputs of any float dtype for all of them."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    #: Variants whose decoder rows are kept at unit norm during training.
    unit_norm_decoder: ClassVar[bool] = False
    #: Whether `training_forward` is implemented (False: an inference-only class for loading SAEs trained elsewhere).
    trainable: ClassVar[bool] = True
    #: Data-parallel training: True when a DDP step over W ranks equals the one-process step on the global batch
    #: (batch-normalised losses and batch-level selections use `global_batch`; other state goes in `sync_state`).
    data_parallel: ClassVar[bool] = False
    #: Some training steps leave a parameter out of the loss (JumpReLU's thresholds during its TopK warm-up):
    #: DistributedDataParallel must then look for unused parameters each step.
    ddp_find_unused_parameters: bool = False

    # Interop names (the formats' own layouts live in saelab.io; each variant says what it maps to).
    #: The SAELens architecture that computes the same inference function from the saved tensors (cfg.json's
    #: `architecture`), or None where SAELens has none.
    saelens_architecture: ClassVar[str | None] = None
    #: SAELens architecture names loaded as this variant.
    saelens_reads: ClassVar[tuple[str, ...]] = ()
    #: dictionary_learning's `dict_class` and `trainer_class` written by export (None: no equivalent there).
    dictionary_learning_class: ClassVar[str | None] = None
    dictionary_learning_trainer: ClassVar[str | None] = None
    #: Further dictionary_learning classes loaded as this variant (its own export class always is).
    dictionary_learning_reads: ClassVar[tuple[str, ...]] = ()
    #: Config fields a saved cfg.json must hold (they change what encode/decode compute); others may default.
    required_fields: ClassVar[tuple[str, ...]] = ("d_in", "d_sae")
    #: Saved tensors that hold NaN while "not estimated yet" (e.g. BatchTopK's threshold before training).
    unset_when_nan: ClassVar[frozenset[str]] = frozenset()
    #: Transcoders (`saelab.sae.transcoder`) map an input x [.., d_in] to another activation y [.., d_out].
    is_transcoder: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        """generator: draws the random initialisation (None: torch's global generator)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.create_parameters(DTYPES[cfg.dtype])
        self.reset_parameters(generator)

    def create_parameters(self, dtype: torch.dtype) -> None:
        """Register the weights (values are set by reset_parameters). Tied variants register fewer."""
        d, n = self.d_in, self.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, n, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))

    @property
    def d_in(self) -> int:
        """Width of the input activations x [..., d_in]."""
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        """Number of latents: the width of the codes z [..., d_sae]."""
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the output: d_in for an SAE (a transcoder predicts another activation)."""
        return self.cfg.d_in

    @property
    def row_width(self) -> int:
        """Width of a training row: d_in for an SAE (a transcoder's rows hold its input and target, [x | y])."""
        return self.cfg.d_in

    def split_row(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Training rows [B, row_width] -> (input [B, d_in], target [B, d_out]); for an SAE both are the rows."""
        return rows, rows

    @property
    def input_bias(self) -> Tensor:
        """[d_in] subtracted from the input before encoding: b_dec for an SAE (a transcoder has its own)."""
        return self.b_dec

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights; inputs are cast to it."""
        return self.b_dec.dtype

    # ----------------------------------------------------------------- init
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random unit directions, encoder tied to the decoder transpose, biases zero."""
        self.tie_random_unit_rows(generator)
        with torch.no_grad():
            self.b_enc.zero_()
            self.b_dec.zero_()

    @torch.no_grad()
    def tie_random_unit_rows(self, generator: torch.Generator | None = None) -> None:
        """W_dec [d_sae, d_in]: random unit rows drawn from `generator`; W_enc [d_in, d_sae]: their transpose."""
        w = torch.randn(self.d_sae, self.d_in, dtype=torch.float32, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)

    def initialize_from_sample(self, x: Tensor) -> None:
        """Data-dependent init from a sample x [N, d_in]; default: b_dec = geometric median."""
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(x).to(self.b_dec.dtype))

    @torch.no_grad()
    def scale_encoder_to_fit(self, x: Tensor, x_hat: Tensor) -> float:
        """Scale W_enc and b_enc by the s > 0 minimising ||(x - b_dec) - s * x_hat||^2 over a sample x [N, d_in],
        x_hat [N, d_in] being the current codes decoded without b_dec (kept as is where s is not finite or <= 0).
        Returns the factor applied (1.0 when none)."""
        centred = (x - self.b_dec).double()
        x_hat = x_hat.double()
        scale = float((centred * x_hat).sum() / x_hat.pow(2).sum())
        if not (math.isfinite(scale) and scale > 0):
            return 1.0
        self.scale_codes(scale)
        return scale

    @torch.no_grad()
    def scale_codes(self, scale: float) -> None:
        """Multiply every code by `scale` > 0 (W_enc and b_enc; variants with other encoders override it)."""
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)

    # ----------------------------------------------------------- inference
    def pre_activations(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> pre-activations [B, n]."""
        return (x - self.input_bias) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor, **kwargs: Any) -> Tensor:
        """x [..., d_in] (cast to the SAE's dtype) -> dense codes z [..., n]; kwargs go to `encode_rows`."""
        return self.encode_rows(self.flat_input(x), **kwargs).reshape(*x.shape[:-1], self.d_sae)

    def encode_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] in the SAE's dtype -> dense codes z [B, n]. Each variant implements this."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """z [..., n] (cast to the SAE's dtype) -> x_hat [..., d_in]."""
        self.check_codes(z)
        return z.to(self.dtype) @ self.W_dec + self.b_dec

    def check_codes(self, z: Tensor) -> None:
        """Raise naming the problem unless z is float codes [..., d_sae] (as `encode` returns)."""
        check_float_vectors(z, self.d_sae, "codes", "decodes", "pass codes from this SAE's encode.")

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """x [..., d_in] (cast to the SAE's dtype) -> reconstruction [..., d_in]."""
        return self.reconstruct_rows(self.flat_input(x), **kwargs).reshape(x.shape)

    def reconstruct_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] in the SAE's dtype -> x_hat [B, d_in]; variants with a faster path override it."""
        return self.decode(self.encode_rows(x))

    def flat_input(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> [B, d_in] in the SAE's dtype (B = product of the leading dims)."""
        self.check_input(x)
        return x.reshape(-1, self.d_in).to(self.dtype)

    def check_input(self, x: Tensor) -> None:
        """Raise naming the problem unless x is float activations [..., d_in]."""
        check_float_vectors(
            x, self.d_in, "input", "takes", "pass activations from the hook the SAE was trained on."
        )

    # ------------------------------------------------------------ training
    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        """One training pass on x [B, d_in]."""
        raise NotImplementedError

    def default_lr(self, batch_size: int) -> float:
        """Adam learning rate used when trainer.lr is left unset: `adam_default_lr` of this shape."""
        return adam_default_lr(self.d_in, self.d_sae, batch_size)

    def sync_state(self) -> None:
        """Under data-parallel training only, after each optimizer step (before `after_optimizer_step`): reduce
        state kept outside the gradients (which DDP averages) across ranks with torch.distributed. Default: none."""

    def missed_target_l0(self, l0: float) -> str | None:
        """After training, a warning when the trained SAE's L0 `l0` misses the variant's `sae.target_l0`
        (`saelab.sae.target_l0`), else None. Default (no target): None."""
        return None

    def resume_at(self, step: int) -> None:
        """Restore host-side training counters when a run resumes at `step` (buffers come from the checkpoint)."""

    def before_optimizer_step(self) -> None:
        """Project out the gradient component parallel to each unit-norm decoder row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            with torch.no_grad():
                w, g = self.W_dec, self.W_dec.grad
                g -= (g * w).sum(dim=1, keepdim=True) * w

    def after_optimizer_step(self) -> None:
        """Re-normalise decoder rows to unit norm where the variant keeps them so."""
        if self.unit_norm_decoder:
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Parameters the optimizer updates (variants may exclude some, e.g. GBA biases)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make the SAE accept raw inputs x when it was trained on scale * x (exact for linear encoders)."""
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    # ------------------------------------------------------------ save/load
    def config_dict(self) -> dict[str, Any]:
        """JSON-ready config in SAELens-6 layout (architecture, d_in, d_sae, dtype, metadata) + variant fields.

        `architecture` is the SAELens name of the same inference function (relu -> "standard", batchtopk ->
        "jumprelu"), so SAELens loads the directory; where SAELens has none (mp, gba) it is a sentence SAELens
        fails on. `saelab_architecture` (which SAELens ignores) is what `saelab.load_sae` builds.
        """
        out = dataclasses.asdict(self.cfg)
        arch = self.cfg.architecture
        out["architecture"] = self.saelens_architecture or (
            f"{arch} (a saelab-only SAE that SAELens cannot load: use saelab.load_sae)"
        )
        out["saelab_architecture"] = arch
        out["apply_b_dec_to_input"] = True
        out["normalize_activations"] = "none"
        out["reshape_activations"] = "none"
        out["sae_lens_version"] = SAELENS_LAYOUT_VERSION
        return out

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors `save` writes (CPU, contiguous): the state dict in the shapes SAELens expects."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def from_file_tensors(cls, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """Inverse of `file_tensors`: the state dict for `load_state_dict` (`where` names the file in errors)."""
        return tensors

    @classmethod
    def absorb_input_offset(cls, tensors: dict[str, Tensor], offset: Tensor) -> None:
        """Change the pre-activation biases of file tensors, in place and in float64, so that encoding x computes
        what encoding x + offset [d_in] did: b_enc += offset @ W_enc (e.g. SAELens's apply_b_dec_to_input=False
        is offset b_dec)."""
        offset = offset.double()
        tensors["b_enc"] = tensors["b_enc"].double() + offset @ tensors["W_enc"].double()

    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """Entries of dictionary_learning's state dict beyond the weights (e.g. k, threshold), for export."""
        return {}

    def dictionary_learning_trainer_fields(self) -> dict[str, Any]:
        """Variant fields of dictionary_learning's config.json `trainer` section beyond class, sizes and k."""
        return {}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Inverse of `dictionary_learning_extras`: (config fields, extra saelab tensors) from the non-weight
        entries of a dictionary_learning state dict and its config's `trainer` section (`where` names the file)."""
        return {}, {}

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` as directory `path` (`~` expanded), atomically; a folder
        already there is replaced only if it holds nothing else (`saelab.core.atomic.atomic_directory`)."""
        tensors = self.file_tensors()
        with atomic_directory(path) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2))
        return Path(path).expanduser()

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> SAE:
        """Build an untrained SAE of this class from a config dict (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        return cls(cls.config_class(**{k: v for k, v in data.items() if k in names}))


def adam_default_lr(d_in: int, d_sae: int, batch_size: int, small_d_in_boost: float = 1.0) -> float:
    """4e-3 * min(sqrt(d_in / 64) * small_d_in_boost, 32 / sqrt(d_in)) * sqrt(min(1, 4096 / d_sae)) * sqrt(batch / 4096).

    Input width: Adam moves every weight by about lr a step whatever the gradient's scale, while a unit-norm
    decoder row has elements of about 1/sqrt(d_in), so a step turns a row by about lr * sqrt(d_in); the rate
    rises with d_in and is capped where lr * sqrt(d_in) reaches its d_in-256 value (0.128 before the width and
    batch factors). `small_d_in_boost` (a variant's, >= 1) raises the rate below that cap only. Width: flat up
    to 4096 latents, then Gao et al.'s 1/sqrt(width). Measurements: BENCHMARKS.md ("Default learning rate",
    "Defaults across scale").
    """
    d_in_factor = min(math.sqrt(d_in / 64) * small_d_in_boost, 32 / math.sqrt(d_in))
    width = math.sqrt(min(1.0, 4096 / d_sae))
    return 4e-3 * d_in_factor * width * math.sqrt(batch_size / 4096)


def tenfold_gao_lr(d_sae: int, batch_size: int) -> float:
    """Ten times Gao et al.'s width-scaled Adam rate, 2e-3 * sqrt(2^14 / d_sae) * sqrt(batch / 4096): the default
    of variants whose tied weights move too slowly at the base rate (MP, GBA; BENCHMARKS.md "Feature recovery")."""
    return 2e-3 / math.sqrt(d_sae / 2**14) * math.sqrt(batch_size / 4096)


class SparseCodes:
    """Mixin of variants with k-sparse codes: `encode_sparse` / `decode_sparse` on [..., d_in] inputs and a
    sparse `forward`.

    The variant implements `encode_sparse_rows(x [B, d_in], k) -> (values [B, w], indices [B, w])` and
    `decode_sparse_rows(values [B, w], indices [B, w], with_bias) -> x_hat [B, d_in]`.
    """

    #: Whether k (active latents per row) is at most d_sae (not for matching pursuit, whose steps may revisit atoms).
    k_at_most_d_sae: ClassVar[bool] = True

    def encode_sparse(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x [..., d_in] (cast to the SAE's dtype) -> (values [..., w], indices [..., w]); k: active latents per
        row, in [1, d_sae] (None: the SAE's own)."""
        if k is not None:
            high = self.d_sae if self.k_at_most_d_sae else None
            check_number("k", k, low=1, high=high, integer=True, hint="None uses the SAE's own k.")
        values, indices = self.encode_sparse_rows(self.flat_input(x), k)
        lead = x.shape[:-1]
        return values.reshape(*lead, values.shape[-1]), indices.reshape(*lead, indices.shape[-1])

    def decode_sparse(self, values: Tensor, indices: Tensor, with_bias: bool = True) -> Tensor:
        """(values [..., w], indices [..., w] into the d_sae latents) -> x_hat [..., d_in], the inverse layout of
        `encode_sparse`; with_bias=False leaves out b_dec. Checks the codes (one device sync on CUDA)."""
        check_sparse_codes(values, indices, self.d_sae)
        flat = self.decode_sparse_rows(
            values.reshape(-1, values.shape[-1]).to(self.dtype),
            indices.reshape(-1, indices.shape[-1]),
            with_bias,
        )
        return flat.reshape(*values.shape[:-1], flat.shape[-1])

    def reconstruct_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> x_hat [B, d_in] through the sparse codes (O(B * w * d_in) decode)."""
        return self.decode_sparse_rows(*self.encode_sparse_rows(x), with_bias=True)


def check_float_vectors(t: Tensor, width: int, noun: str, verb: str, hint: str) -> None:
    """Raise ValueError / TypeError unless t is floating point [..., width]. noun: "input" (width d_in) or
    "codes" (width d_sae); verb: what the SAE does with it; hint: the fix."""
    field = "d_in" if noun == "input" else "d_sae"
    has = "have" if noun.endswith("s") else "has"
    if t.ndim == 0 or t.shape[-1] != width:
        raise ValueError(
            f"{noun} {has} shape {tuple(t.shape)} but this SAE {verb} [..., {field}={width}]; {hint}"
        )
    if not t.is_floating_point():
        kind = "activations" if noun == "input" else noun
        raise TypeError(f"{noun} {has} dtype {t.dtype}; pass floating-point {kind}.")


def check_sparse_codes(values: Tensor, indices: Tensor, d_sae: int) -> None:
    """Raise a ValueError/TypeError naming the problem unless values and indices [..., w] are codes of an SAE
    with d_sae latents: same shape (at least 1-D), floating values, integer indices in [0, d_sae)."""
    if values.shape != indices.shape or values.ndim == 0:
        raise ValueError(
            f"sparse codes need values and indices of the same [..., w] shape, got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}; pass the pair that encode_sparse returned."
        )
    if not values.is_floating_point():
        raise TypeError(f"code values have dtype {values.dtype}; pass floating-point values.")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"code indices have dtype {indices.dtype}; pass int64 (or int32) latent indices.")
    if indices.numel() and not bool(((indices >= 0) & (indices < d_sae)).all()):
        low, high = int(indices.min()), int(indices.max())
        raise ValueError(
            f"code indices span [{low}, {high}] but this SAE has d_sae={d_sae} latents (valid: 0 to {d_sae - 1}); "
            "decode codes with the SAE that encoded them."
        )


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm on x [N, d] in float64; returns [d]."""
    pts = x.detach().to(torch.float64)
    median = pts.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (pts - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * pts).sum(dim=0) / weights.sum()
        if (new - median).norm() <= 1e-7 * (median.norm() + 1e-12):
            median = new
            break
        median = new
    return median.to(x.dtype)


def load_weights(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning any read failure into a clear error naming the file."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(
            f"could not read SAE weights from {path}: {err}. The file is missing or corrupt."
        ) from err
    check_float_tensors(tensors, path, tensors)
    return tensors


def check_float_tensors(tensors: dict[str, Tensor], where: Path | str, names: Iterable[str]) -> None:
    """Raise naming `where` unless every tensor of `names` is floating point (SAE weights never are int or
    bool: such a file is not an SAE's weights, and casting it would compute garbage silently)."""
    wrong = [f"{name} ({tensors[name].dtype})" for name in names if not tensors[name].is_floating_point()]
    if wrong:
        raise ValueError(
            f"{where}: tensors {', '.join(wrong)} are not floating point; SAE weights are float32, float16, "
            "bfloat16 or float64. The file is not an SAE's weights or is damaged."
        )
