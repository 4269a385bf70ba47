"""Trainer and logging settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from saelab.core.checks import check_flags, check_number
from saelab.core.device import check_device_name

#: trainer.autocast_dtype values -> the autocast dtype (None: no autocast); "auto" is resolved by the trainer.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bfloat16": torch.bfloat16}
AUTOCAST_CHOICES = ("auto", *AUTOCAST_DTYPES)


#: Tokens a run reads from an endless source (planted features, a live model) when trainer.total_tokens is 0.
DEFAULT_TOTAL_TOKENS = 20_000_000


@dataclass
class TrainerConfig:
    """Optimisation, schedule, dead-latent window and checkpointing.

    total_tokens: tokens to train on; 0 (the default) is one pass over a source of finite length (an activation
    cache: its rows less the held-out batches) and DEFAULT_TOTAL_TOKENS from an endless one (planted features,
    a live model); `for_source` resolves it, and a Trainer given 0 uses DEFAULT_TOTAL_TOKENS.
    lr: Adam learning rate; None picks the variant's width- and batch-scaled default.
    lr_warmup_frac / lr_decay_frac: linear warm-up over the first, linear decay to 0 over the last fraction.
    dead_window_tokens: a latent is dead after this many tokens without firing; 0 -> min(10M, total / 20).
    checkpoint_every: steps between checkpoints (0: only the final save).
    checkpoint_every_minutes: also checkpoint after this many minutes of training since the last checkpoint (0
    disables), so a job killed without warning (preemption without a grace period, a node failure) loses at most
    that much. SIGINT / SIGTERM / SIGUSR2 checkpoint at the next step boundary anyway (saelab.train.preemption).
    eval_every: steps between held-out evaluations (FVU, L0, cosine, dead fraction; 0 disables). The first
    eval_batches batches of the source are held out for it and never trained on.
    autocast_dtype: "bfloat16" runs the forward pass under bf16 autocast (float32 master weights, optimizer
    and gradients); "none" keeps everything in the SAE's dtype; "auto" (default) is bfloat16 on CUDA for a
    float32 SAE and none otherwise (CPU). compile: wrap the SAE's training forward in torch.compile.
    batch_size: rows per step (global under torchrun). adam_beta1 / adam_beta2 / adam_eps: Adam's settings.
    grad_clip_norm: the gradient norm is clipped to this. normalize_activations: scale inputs so E||x|| =
    sqrt(d_in) (folded into the saved weights). dead_check_every: steps between dead-latent checks (and the
    ranks' agreement on checkpoints and stops). seed: the SAE's initialisation and sampling streams. device:
    "auto" (CUDA when there is one), "cpu", "cuda", "cuda:N". log_every: steps between logged metrics.
    keep_checkpoints: the newest checkpoints kept. resume_from: a run directory or checkpoint to continue.
    eval_batches: batches held out for eval_every.
    """

    total_tokens: int = 0
    batch_size: int = 4096
    lr: float | None = None
    lr_warmup_frac: float = 0.02
    lr_decay_frac: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    normalize_activations: bool = True
    dead_window_tokens: int = 0
    dead_check_every: int = 10
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 0
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 2
    resume_from: str | None = None
    eval_every: int = 0
    eval_batches: int = 4
    autocast_dtype: str = "auto"
    compile: bool = False

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: tokens // batch_size (at least 1)."""
        return max(1, self.tokens // self.batch_size)

    @property
    def tokens(self) -> int:
        """total_tokens, or DEFAULT_TOTAL_TOKENS where it is 0 (unresolved)."""
        return self.total_tokens or DEFAULT_TOTAL_TOKENS

    @property
    def dead_window(self) -> int:
        """Tokens without firing after which a latent counts as dead: dead_window_tokens, or min(10M, total / 20)
        (at least 10 batches)."""
        return self.dead_window_tokens or min(10_000_000, max(self.tokens // 20, 10 * self.batch_size))

    def for_source(self, source: object | None) -> TrainerConfig:
        """A copy with total_tokens resolved where it is 0: one pass over a source that has `distinct_rows` (an
        activation cache), less the batches held out for trainer.eval_every; DEFAULT_TOTAL_TOKENS otherwise."""
        if self.total_tokens:
            return self
        rows = getattr(source, "distinct_rows", None)
        if rows is None:
            return dataclasses.replace(self, total_tokens=DEFAULT_TOTAL_TOKENS)
        held_out = self.eval_batches if self.eval_every else 0
        batches = rows // self.batch_size - held_out
        if batches < 1:
            raise ValueError(
                f"trainer.total_tokens=0 means one pass over the source, but its {rows:,} rows hold fewer than one "
                f"batch of trainer.batch_size={self.batch_size}"
                + (f" after the {held_out} held out (trainer.eval_batches)" if held_out else "")
                + "; lower trainer.batch_size or harvest more tokens."
            )
        return dataclasses.replace(self, total_tokens=batches * self.batch_size)

    def validate(self) -> None:
        """Raise ValueError naming the offending trainer field and the fix."""
        check_flags(self, "trainer")
        for name in ("batch_size", "log_every", "dead_check_every", "keep_checkpoints"):
            check_number(f"trainer.{name}", getattr(self, name), low=1, integer=True)
        for name in ("dead_window_tokens", "checkpoint_every", "eval_every", "eval_batches"):
            check_number(f"trainer.{name}", getattr(self, name), low=0, integer=True, hint="0 disables it.")
        check_number(
            "trainer.total_tokens", self.total_tokens, low=0, integer=True, hint="0: one pass over a cache."
        )
        check_number(
            "trainer.checkpoint_every_minutes", self.checkpoint_every_minutes, low=0, hint="0 disables it."
        )
        check_number("trainer.seed", self.seed, integer=True)
        if self.total_tokens and self.total_tokens < self.batch_size:
            raise ValueError(
                f"trainer.total_tokens={self.total_tokens} is smaller than one batch "
                f"(trainer.batch_size={self.batch_size}); raise total_tokens or lower batch_size."
            )
        if self.lr is not None:
            check_number(
                "trainer.lr", self.lr, low=0, low_open=True, hint="Use null for the automatic default."
            )
        for name in ("lr_warmup_frac", "lr_decay_frac"):
            check_number(f"trainer.{name}", getattr(self, name), low=0, high=1)
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise ValueError("trainer.lr_warmup_frac + trainer.lr_decay_frac must be <= 1.")
        for name in ("adam_beta1", "adam_beta2"):
            check_number(f"trainer.{name}", getattr(self, name), low=0, high=1, high_open=True)
        check_number(
            "trainer.adam_eps",
            self.adam_eps,
            low=0,
            low_open=True,
            hint="Adam divides by sqrt(v) + eps; 1e-8 is usual.",
        )
        check_number("trainer.grad_clip_norm", self.grad_clip_norm, low=0, hint="0 disables clipping.")
        if self.autocast_dtype not in AUTOCAST_CHOICES:
            raise ValueError(
                f"trainer.autocast_dtype={self.autocast_dtype!r} must be one of {sorted(AUTOCAST_CHOICES)}."
            )
        if self.eval_every and self.eval_batches < 1:
            raise ValueError(f"trainer.eval_batches={self.eval_batches} must be >= 1 when eval_every > 0.")
        check_device_name("trainer.device", self.device)


@dataclass
class LoggingConfig:
    """wandb_mode: 'disabled', 'offline' or 'online'. progress: show a progress bar.

    project / entity: the wandb project and entity. group: the wandb group (a sweep's jobs default to the sweep
    directory). run_name: the wandb run name (a sweep's jobs default to their overrides).
    """

    wandb_mode: str = "disabled"
    project: str = "saelab"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the offending logging field."""
        check_flags(self, "logging")
        if self.wandb_mode not in ("disabled", "offline", "online"):
            raise ValueError(
                f"logging.wandb_mode={self.wandb_mode!r} must be 'disabled', 'offline' or 'online'."
            )
