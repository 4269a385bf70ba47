"""The training loop: any stream of activation batches [B, d_in] in, a trained SAE out.

Per step: normalise, variant forward/loss, backward, decoder-gradient projection, gradient clipping,
Adam step, decoder renormalisation, schedule, dead-latent bookkeeping. Host syncs happen only every
`dead_check_every` / `log_every` steps. Under torchrun the same loop runs data-parallel (saelab.parallel.distributed):
each rank trains on its slice of every global batch and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from saelab.core.device import resolve_device
from saelab.io.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from saelab.kernels.auxk import dead_latent_list
from saelab.metrics.dead import DeadLatentTracker
from saelab.metrics.heldout import heldout_metrics
from saelab.parallel import distributed
from saelab.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig, TrainContext, TrainOutput
from saelab.sources.registry import source_metadata
from saelab.train.config import AUTOCAST_DTYPES, LoggingConfig, TrainerConfig
from saelab.train.lock import run_dir_lock
from saelab.train.logger import RunLogger
from saelab.train.preemption import CheckpointClock, TrainingStopped, catch_stop_signals, stop_requested
from saelab.train.resume import check_resume_settings
from saelab.train.schedule import lr_multiplier

#: Device types whose Adam has a fused (single-kernel) implementation; others use the foreach one.
FUSED_ADAM_DEVICES = ("cuda", "cpu")


class BatchSource(Protocol):
    """An activation source that can restart its stream at a given batch number (for exact resume)."""

    d_in: int

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[Tensor]: ...


@dataclass
class TrainResult:
    """The trained SAE (accepting raw, un-normalised inputs), its input scale and the logged history.

    base_lr: the rate before the warm-up/decay schedule (trainer.lr, or the variant's default when unset).
    dead_fraction: latents silent for the last `dead_window_tokens` training tokens (the AuxK window, or the
    whole run when shorter; `DeadLatentTracker.reported_dead`) under the SAE's inference encoder, the one the
    saved SAE computes (BatchTopK and Matryoshka: their threshold, not the batch-level training selection). A
    check over fewer tokens (e.g. held-out batches, `eval_history`'s heldout/dead_frac) counts more latents
    dead: a latent firing once in 100k tokens is alive here and silent on 32k held-out rows.
    final_metrics: loss (the last logged), fvu and l0 of the saved SAE on the run's last batch, dead_frac.
    """

    sae: SAE
    steps: int
    tokens: int
    input_scale: float
    base_lr: float
    dead_fraction: float
    dead_window_tokens: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None
    eval_history: list[dict[str, float]] = field(default_factory=list)


def norm_scale(x: Tensor) -> float:
    """sqrt(d_in) / mean ||x||, so that scaled inputs have E||x|| = sqrt(d_in)."""
    mean_norm = x.double().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError("cannot normalise activations: the first batch has zero or non-finite norm.")
    return math.sqrt(x.shape[-1]) / mean_norm


def check_trainable_dtype(dtype: torch.dtype) -> None:
    """Refuse float16 weights: Adam's eps (1e-8) underflows to 0 in float16 and its range (65504) is easily
    exceeded, so training turns NaN within a few dozen steps. bfloat16 (float32's range) and float32/64 train."""
    if dtype == torch.float16:
        raise ValueError(
            "sae.dtype=float16 cannot be trained (Adam's eps underflows to 0 in float16 and values overflow its "
            "range, so the loss turns NaN): train with sae.dtype=float32 (trainer.autocast_dtype=bfloat16 gives "
            "half-precision compute on CUDA) and load the result in float16 with "
            "saelab.load_sae(path, dtype='float16')."
        )


def resolve_autocast(name: str, device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    """trainer.autocast_dtype -> the autocast dtype (None: off). "auto": bf16 on CUDA for float32 weights
    (where the GPU supports bf16), off elsewhere (CPU, other weight dtypes)."""
    if name != "auto":
        return AUTOCAST_DTYPES[name]
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 and weight_dtype == torch.float32 else None


def check_batch(x: Tensor, width: int, step: int) -> None:
    """x must be [batch, width]: width is the SAE's `row_width` (d_in, or a transcoder's d_in + d_out)."""
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(
            f"batch at step {step} has shape {tuple(x.shape)}, expected [batch, {width}]; "
            "sae.d_in (and a transcoder's sae.d_out) must match the activation source."
        )


def check_fresh_output_dir(output_dir: Path | None) -> None:
    """A new run (not a resume) refuses a directory holding another run's complete checkpoints (a crashed
    write's temporaries do not count) or final SAE: they would be mixed and pruned with the new run's, and
    `load_sae` or a resume would pick up the wrong run's."""
    if output_dir is None:
        return
    found = [f"checkpoints/{path.name}" for path in list_checkpoints(output_dir / "checkpoints")[-1:]]
    found += ["sae/"] if (output_dir / "sae").exists() else []
    if found:
        raise FileExistsError(
            f"{output_dir} already holds {' and '.join(found)} of an earlier run; resume "
            f"it with trainer.resume_from={str(output_dir)!r} or train into a new directory."
        )


#: What a run writes in its output directory, besides what `extra_outputs` names (e.g. the CLI's summary.json).
SAE_FOLDER, CHECKPOINTS_FOLDER = "sae", "checkpoints"


def check_output_targets(output_dir: Path | None, extra_outputs: tuple[str, ...] = ()) -> None:
    """Before step 0 (fresh or resumed run): refuse, naming each, targets the run could only fail to write at its
    end: an output directory that is a file or not writable, `sae/` or `checkpoints/` that are files, a `sae/`
    holding files other than an SAE's (they would be deleted), a file of `extra_outputs` that is a folder."""
    if output_dir is None:
        return
    problems = []
    if output_dir.exists() and not output_dir.is_dir():
        problems.append(f"{output_dir} is a file, not a directory")
    elif output_dir.exists() and not os.access(output_dir, os.W_OK | os.X_OK):
        problems.append(f"{output_dir} is not writable by this user")
    for folder in (SAE_FOLDER, CHECKPOINTS_FOLDER):
        if (output_dir / folder).exists() and not (output_dir / folder).is_dir():
            problems.append(f"{output_dir / folder} is a file (the run writes a folder there)")
    sae_dir = output_dir / SAE_FOLDER
    if sae_dir.is_dir():
        foreign = sorted(e.name for e in sae_dir.iterdir() if e.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if foreign:
            problems.append(
                f"{sae_dir} holds {', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}, which writing the "
                "trained SAE there would delete (move them out)"
            )
    problems += [f"{output_dir / name} is a folder (the run writes a file there)" for name in extra_outputs
                 if (output_dir / name).is_dir()]  # fmt: skip
    if problems:
        raise FileExistsError(
            f"the run could not write its results: {'; '.join(problems)}. Fix that, or train into another "
            "directory, before any step is trained."
        )


def data_metadata(source: object, heldout_offset: int, batch_size: int) -> dict[str, Any]:
    """What the trained SAE records about its data: the source's own description (`metadata()`; the SAE's own
    metadata wins) and, for a source of indexed batches, the indices trained on, `training_batches` {start,
    end, batch_size} (end filled in at the end), so that an evaluation can start past them."""
    meta = source_metadata(source)
    if hasattr(source, "batches"):
        meta["training_batches"] = {"start": heldout_offset, "end": heldout_offset, "batch_size": batch_size}
    return meta


#: Passes over a source of finite length (a cache) beyond which a run warns: it mostly re-reads the same rows.
FEW_PASSES = 4


def warn_many_passes(source: object, cfg: TrainerConfig, heldout_batches: int) -> None:
    """Warn, before training, when the run reads a finite source's rows more than FEW_PASSES times."""
    rows = getattr(source, "distinct_rows", None)
    if not rows:
        return
    passes = (cfg.total_steps + heldout_batches) * cfg.batch_size / rows
    if passes > FEW_PASSES:
        warnings.warn(
            f"trainer.total_tokens={cfg.total_tokens:,} reads the source's {rows:,} distinct rows {passes:.1f} "
            "times over; set trainer.total_tokens=0 for one pass, or harvest more tokens.",
            UserWarning,
            stacklevel=3,
        )


def check_heldout_finite(batches: list[Tensor]) -> None:
    """Refuse held-out batches [B, d_in] holding NaN or Inf, as a training batch would be: every held-out
    figure computed from them would be NaN."""
    bad = [i for i, x in enumerate(batches) if not bool(torch.isfinite(x).all())]
    if bad:
        raise ValueError(
            f"held-out batches {bad} (of the first trainer.eval_batches={len(batches)} batches of the source, "
            "kept for trainer.eval_every) contain NaN or Inf; check the activation source."
        )


def warn_non_finite(row: dict[str, float]) -> None:
    """Warn naming each held-out figure of `row` that is NaN or Inf (e.g. an FVU over rows without variance)."""
    bad = {k: v for k, v in row.items() if not math.isfinite(v)}
    if bad:
        warnings.warn(
            f"held-out figures at step {int(row['step'])} are not finite: {bad} (finite inputs; e.g. rows without "
            "variance make the FVU undefined). They are logged and written as they are.",
            RuntimeWarning,
            stacklevel=2,
        )


class BatchesExhausted(ValueError):
    """The batch iterator or source ran out before the run's last step."""


class Trainer:
    """Trains `sae` on batches; `fit(source_or_iterator)` runs to trainer.total_tokens.

    Under torchrun (or with a process group already initialised) it trains data-parallel: batch_size and
    total_tokens stay global, and on ranks other than 0 logging is off and nothing is written (output_dir None).
    """

    def __init__(
        self,
        sae: SAE,
        cfg: TrainerConfig,
        logging: LoggingConfig | None = None,
        output_dir: str | Path | None = None,
        run_config: dict[str, Any] | None = None,
        ranks: distributed.Distributed | None = None,
    ):
        """ranks: this process's place in a data-parallel run; None: the process group's, as `distributed.setup`
        finds it (`Distributed()` trains alone even inside a process group, e.g. SAEs spread over ranks)."""
        cfg.validate()
        cfg = cfg.for_source(
            None
        )  # total_tokens 0: DEFAULT_TOTAL_TOKENS (resolve for a cache before: `for_source`)
        check_trainable_dtype(sae.W_dec.dtype)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = ranks if ranks is not None else distributed.setup(self.device)
        self.dist.check(sae, cfg.batch_size)
        self.sae = sae.to(self.device)
        self.logging = logging or LoggingConfig(progress=False)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        #: files the caller writes in output_dir after `fit`, checked before step 0 with the trainer's own
        self.extra_outputs: tuple[str, ...] = ()
        if not self.dist.is_main:
            self.logging = LoggingConfig(wandb_mode="disabled", progress=False)
            self.output_dir = None
        self.run_config = run_config or {}
        self.data_metadata: dict[str, Any] = {}  # set by `fit` from its source (`data_metadata`)
        # a live model source's training stream (its `contexts_read`: the text it has read), and where a
        # resumed run starts in the text (the checkpoint's record of that position)
        self.source_stream: Any = None
        self.resume_contexts: int | None = None
        self.lr = cfg.lr if cfg.lr is not None else sae.default_lr(cfg.batch_size)
        fused = self.device.type in FUSED_ADAM_DEVICES
        self.optimizer = torch.optim.Adam(
            sae.optimizer_param_groups(),
            lr=self.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=fused,
            foreach=not fused,
        )
        self.autocast_dtype = resolve_autocast(cfg.autocast_dtype, self.device, sae.W_dec.dtype)
        if self.autocast_dtype is not None and sae.W_dec.dtype != torch.float32:
            raise ValueError(
                f"trainer.autocast_dtype={cfg.autocast_dtype} keeps float32 master weights, but the SAE is "
                f"{sae.W_dec.dtype}; set sae.dtype=float32 (or trainer.autocast_dtype=none)."
            )
        forward = torch.compile(sae.training_forward) if cfg.compile else sae.training_forward
        self.forward = self.dist.wrap(sae, forward)
        total = cfg.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, total, cfg.lr_warmup_frac, cfg.lr_decay_frac)
        )
        self.tracker = DeadLatentTracker(sae.d_sae, cfg.dead_window, self.device)
        #: Firing under the inference encoder (`TrainOutput.inference_fired`), for the reported dead fraction; the
        #: training selection's `tracker` drives AuxK. The two count the same for most variants.
        self.inference_tracker = DeadLatentTracker(sae.d_sae, cfg.dead_window, self.device)
        self.step = 0
        self.input_scale = 1.0
        self.history: list[dict[str, float]] = []
        #: Host-side "some latent is dead" flag, the padded list of dead latents (for AuxK) and the on-device
        #: "all inputs finite" flag, refreshed by `fit`.
        self.any_dead, self.dead_latents = False, None
        self.refresh_dead()
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        #: Last steps at which the inputs, the weights (and optimizer state) and the logged loss were seen finite.
        self.inputs_checked_at = self.weights_checked_at = self.loss_checked_at = 0
        self.heldout_offset = cfg.eval_batches if cfg.eval_every else 0
        self.heldout: list[Tensor] = []
        self.clock = CheckpointClock(cfg.checkpoint_every_minutes)  # time-based checkpoints, restarted by fit
        self.eval_history: list[dict[str, float]] = []
        #: Start time and tokens of the throughput window the next log row reports (`open_run`, `record_step`).
        self.window_start, self.window_tokens = time.perf_counter(), 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides the weights: step, input scale, optimizer, schedule, RNG, dead-latent
        tracker."""
        state: dict[str, Any] = {
            "step": self.step,
            "input_scale": self.input_scale,
            "lr": self.lr,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "inference_tracker": self.inference_tracker.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "heldout_offset": self.heldout_offset,
            "contexts_read": self.contexts_read(),
            # every buffer, the non-persistent ones too (e.g. GBA's bias-update window), so a resume is exact
            "sae_buffers": {name: buf.detach().cpu() for name, buf in self.sae.named_buffers()},
            # what `from_checkpoint` compares a resumed run's settings with
            "trainer_config": dataclasses.asdict(self.cfg),
            "run_config": self.run_config,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; refuses a state whose held-out batches differ from this config's."""
        self.step = int(state["step"])
        self.input_scale = float(state["input_scale"])
        if int(state.get("heldout_offset", 0)) != self.heldout_offset:
            raise ValueError(
                "trainer.eval_every / trainer.eval_batches hold out a different number of batches than the "
                "checkpointed run did; resume with the original settings."
            )
        self.resume_contexts = state.get("contexts_read")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.load_state_dict(state["tracker"])
        self.inference_tracker.load_state_dict(state.get("inference_tracker", state["tracker"]))
        buffers = dict(self.sae.named_buffers())
        with torch.no_grad():
            for name, value in state.get("sae_buffers", {}).items():
                buffers[name].copy_(value)
        self.sae.resume_at(self.step)
        torch.set_rng_state(state["cpu_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        cfg: TrainerConfig,
        logging: LoggingConfig | None = None,
        output_dir: str | Path | None = None,
        run_config: dict[str, Any] | None = None,
        sae_config: SAEConfig | None = None,
        ranks: distributed.Distributed | None = None,
    ) -> Trainer:
        """Rebuild a trainer (SAE, optimizer, schedule, tracker, RNG) from a checkpoint to continue the run.

        Refuses (ValueError naming each field, old -> new) trainer settings, `run_config`'s source section and
        `sae_config` (the SAE the caller asked for, resolved) that differ from the checkpointed run's, except
        those that are safe to change (`saelab.train.resume.SAFE_TRAINER_FIELDS`, logging)."""
        cfg.validate()
        ckpt = resolve_checkpoint(path)
        sae, state = load_checkpoint(ckpt, resolve_device(cfg.device))
        check_resume_settings(ckpt, state, sae.cfg, cfg, run_config, sae_config)
        if int(state["step"]) >= cfg.total_steps:
            raise ValueError(
                f"trainer.resume_from={str(path)!r}: its checkpoint {ckpt.name} is at step {int(state['step'])}, "
                f"already at or past this run's end (trainer.total_tokens={cfg.total_tokens:,} is "
                f"{cfg.total_steps} steps of {cfg.batch_size}); raise trainer.total_tokens to train further."
            )
        sae.train()
        trainer = cls(sae, cfg, logging, output_dir, run_config, ranks)
        trainer.load_state_dict(state)
        return trainer

    # ------------------------------------------------------------------- loop
    def _stream(self, source: BatchSource | Iterator[Tensor]) -> Iterator[Tensor]:
        if not hasattr(source, "batches"):
            return self._checked(iter(source), plain=True)
        start = self.step + self.heldout_offset
        if not getattr(source, "repeats_text", False):
            return self._checked(iter(source.batches(self.cfg.batch_size, start_batch=start)), plain=False)
        # a live model source: held-out text stays out of every pass, and a resumed run starts past all the
        # text the checkpointed run read
        self.source_stream = source.batches(
            self.cfg.batch_size,
            start_batch=start,
            reserved_batches=self.heldout_offset,
            skip_contexts=self.resume_contexts,
        )
        return self._checked(iter(self.source_stream), plain=False)

    def _checked(self, batches: Iterator[Tensor], plain: bool) -> Iterator[Tensor]:
        """The run's batches; running out before the last step raises BatchesExhausted naming how many were
        needed. A plain iterator's batches (which also supply the held-out ones) are checked to be float
        tensors of trainer.batch_size rows: the step count, token count and default rate assume that size."""
        needed = self.cfg.total_steps - self.step + (self.heldout_offset if plain else 0)
        for count in range(needed):
            try:
                x = next(batches)
            except StopIteration:
                raise BatchesExhausted(
                    f"the batch {'iterator' if plain else 'source'} ran out after {count} batches, but this "
                    f"run needs {needed} (trainer.total_tokens={self.cfg.total_tokens:,} in batches of "
                    f"{self.cfg.batch_size}"
                    + (
                        f", plus {self.heldout_offset} held out for evaluation"
                        if plain and self.heldout_offset
                        else ""
                    )
                    + (f", from step {self.step}" if self.step else "")
                    + "); pass more batches or lower trainer.total_tokens."
                ) from None
            if plain and (not isinstance(x, Tensor) or not x.is_floating_point()):
                what = f"a {x.dtype} tensor" if isinstance(x, Tensor) else f"a {type(x).__name__}"
                raise TypeError(f"batch {count} from the iterator is {what}; yield float activation tensors.")
            if plain and (x.ndim != 2 or x.shape[0] != self.cfg.batch_size):
                raise ValueError(
                    f"batch {count} from the iterator has shape {tuple(x.shape)}, but trainer.batch_size="
                    f"{self.cfg.batch_size}: yield [{self.cfg.batch_size}, d_in] batches (the run's step count, "
                    "token count and default learning rate assume that size) or set trainer.batch_size."
                )
            yield x

    def _take_heldout(self, source: BatchSource | Iterator[Tensor], stream: Iterator[Tensor]) -> list[Tensor]:
        """The first `heldout_offset` batches of the source (never trained on), on the training device. A source
        that repeats its rows after `distinct_rows` (an activation cache) must not reach them again."""
        if not self.heldout_offset:
            return []
        self.check_heldout_fits(source)
        if not hasattr(source, "batches"):
            return [next(stream).to(self.device) for _ in range(self.heldout_offset)]
        held = source.batches(self.cfg.batch_size, start_batch=0)
        batches = [next(held).to(self.device) for _ in range(self.heldout_offset)]
        if hasattr(held, "close"):
            held.close()  # release the held-out stream's buffers
        return batches

    def check_heldout_fits(self, source: object) -> None:
        """Refuse a run whose training would reach the held-out rows again: a source that repeats its rows after
        `distinct_rows` (an activation cache) must hold the held-out batches and every training batch."""
        rows = getattr(source, "distinct_rows", None)
        needed = (self.heldout_offset + self.cfg.total_steps) * self.cfg.batch_size
        if rows is not None and needed > rows:
            most = (rows // self.cfg.batch_size - self.heldout_offset) * self.cfg.batch_size
            raise ValueError(
                f"trainer.eval_every holds out the first {self.heldout_offset} batches, but this run reads "
                f"{needed:,} rows from a source of {rows:,} distinct rows, which it then repeats: the held-out "
                f"rows would be trained on. Lower trainer.total_tokens to at most {max(most, 0):,}, or set "
                "trainer.eval_every=0 and evaluate afterwards with `saelab eval`."
            )

    def prepare(self, first: Tensor) -> Tensor:
        """First batch [B, d_in] of a fresh run (the whole global batch under torchrun): estimate the input
        scale and run the data-dependent init."""
        first = first.to(self.device, dtype=self.sae.W_enc.dtype)
        check_batch(first, self.sae.row_width, 0)
        if not torch.isfinite(first).all():
            raise ValueError("the first activation batch contains NaN or Inf; check the activation source.")
        if self.cfg.normalize_activations:
            self.input_scale = norm_scale(self.sae.split_row(first)[0])  # of the input (a transcoder's x)
        self.sae.initialize_from_sample(first * self.input_scale)
        return first

    def fit(self, source: BatchSource | Iterator[Tensor]) -> TrainResult:
        """Train until trainer.total_tokens; returns the SAE with the input scale folded in. Holds the run
        directory's lock (`saelab.train.lock`) throughout, so a second live run there is refused. SIGINT, SIGTERM
        and SIGUSR2 stop it at the next step boundary with a checkpoint (`saelab.train.preemption`): it raises
        TrainingStopped."""
        with run_dir_lock(self.output_dir), catch_stop_signals():
            return self._fit(source)

    def _fit(self, source: BatchSource | Iterator[Tensor]) -> TrainResult:
        cfg, sae = self.cfg, self.sae
        check_output_targets(self.output_dir, self.extra_outputs)
        if self.step == 0:
            check_fresh_output_dir(self.output_dir)
        self.data_metadata = data_metadata(source, self.heldout_offset, cfg.batch_size)
        warn_many_passes(source, cfg, self.heldout_offset)
        total = cfg.total_steps
        stream = self._stream(source)
        self.heldout = self._take_heldout(source, stream)
        check_heldout_finite(self.heldout)
        pending = [self.prepare(next(stream))] if self.step == 0 else []
        self.input_scale = self.dist.broadcast_start(sae, self.input_scale)
        logger = self.open_run()
        x = pending[0] if pending else torch.empty(0)  # the last batch trained on, once the loop has run
        try:
            while self.step < total:
                try:
                    x = pending.pop() if pending else next(stream)
                except BatchesExhausted as err:
                    raise BatchesExhausted(f"{err} {self.save_for_later()}") from None
                out = self.train_step(self.dist.shard(x))
                self.record_step(out, x.shape[0], logger)
                if self.step < total:
                    self.checkpoint_or_stop()
            self.check_finite()
            result = self._finish(logger, x)
        finally:
            logger.close()
        return result

    def checkpoint_or_stop(self) -> None:
        """Between two steps: checkpoint when `checkpoint_decision` says so, then raise TrainingStopped if a stop
        signal was caught."""
        due, stop = self.checkpoint_decision()
        if not (due or stop):
            return
        self.check_finite()
        path = self.save_checkpoint()
        self.clock.restart()
        if stop:
            raise TrainingStopped(stop_requested() or signal.SIGTERM, self.step, path, self.output_dir)

    def checkpoint_decision(self) -> tuple[bool, bool]:
        """(checkpoint now, stop now) after this step (never at the last one: the final SAE is saved then): a
        checkpoint every trainer.checkpoint_every steps and every trainer.checkpoint_every_minutes, and a stop
        when a signal was caught (`catch_stop_signals`). One process reads its clock and signal flag without a
        device sync; under torchrun the ranks agree on both at the dead_check_every steps (one small
        all-reduce), so that they checkpoint and stop together."""
        cfg = self.cfg
        if self.step >= cfg.total_steps:
            return False, False
        by_steps = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
        due, stop = self.clock.due(), stop_requested() is not None
        if self.dist.enabled:
            agree = self.step % cfg.dead_check_every == 0
            due, stop = self.dist.any_true([due, stop], self.device) if agree else (False, False)
        return by_steps or due or stop, stop

    def open_run(self) -> RunLogger:
        """Start the logged part of a run, after `prepare` (or a resume) and before its first step: the logger
        (progress bar, wandb) at this step, the dead-latent list, the finiteness checks and the throughput window
        reset, the SAE in training mode. Loops that drive `train_step` themselves call it, then `record_step`."""
        logger = RunLogger(self.logging, self.cfg.total_steps, self.run_config, self.output_dir)
        logger.start_at(self.step)
        self.refresh_dead()
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.inputs_checked_at = self.weights_checked_at = self.loss_checked_at = self.step
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.clock.restart()
        self.sae.train()
        return logger

    def record_step(self, out: TrainOutput, rows: int, logger: RunLogger) -> None:
        """What follows each step (`rows`: the global batch's): progress, `periodic_checks`, the log row every
        log_every steps and the held-out evaluation every eval_every steps (and both at the last step)."""
        cfg, total = self.cfg, self.cfg.total_steps
        self.window_tokens += rows
        logger.advance()
        self.periodic_checks()
        if self.step % cfg.log_every == 0 or self.step == total:
            elapsed = time.perf_counter() - self.window_start
            row = self._metrics_row(out, self.window_tokens / max(elapsed, 1e-9))
            self.history.append(row)
            logger.log(self.step, row)
            self.window_start, self.window_tokens = time.perf_counter(), 0
        evaluate = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == total)
        if evaluate and self.dist.is_main:
            row = {"step": float(self.step), **heldout_metrics(self.sae, self.heldout, self.input_scale)}
            warn_non_finite(row)
            self.eval_history.append(row)
            logger.log(self.step, row)

    def periodic_checks(self) -> None:
        """What `fit` does after each step, for loops that drive `train_step` themselves: every dead_check_every
        steps and at the last step, check the inputs were finite and refresh the dead-latent list (one sync)."""
        if self.step % self.cfg.dead_check_every == 0 or self.step == self.cfg.total_steps:
            self.check_inputs_finite()
            self.refresh_dead()

    def refresh_dead(self) -> None:
        """Read the dead-latent state for the next steps (one device sync): `any_dead` and the padded list of
        dead latents that AuxK gathers (`kernels.auxk.dead_latent_list`); `periodic_checks` calls it."""
        latents = dead_latent_list(self.tracker.dead_mask)
        self.any_dead = latents.numel() > 0
        self.dead_latents = latents if self.any_dead else None

    def train_step(self, x: Tensor) -> TrainOutput:
        """One optimisation step on a raw batch x [B, d_in] (this rank's slice of the global batch under
        torchrun); no host sync (NaN/Inf inputs are flagged in `self.finite`, checked by `fit` every
        dead_check_every steps and, with the weights, before every save)."""
        scaled, ctx = self.step_inputs(x)
        with self.autocast():
            out = self.forward(scaled, ctx)
        fired = self.dist.any_fired(out.fired)
        inference_fired = None if out.inference_fired is None else self.dist.any_fired(out.inference_fired)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.apply_gradients(fired, x.shape[0], inference_fired)
        return out

    def step_inputs(self, x: Tensor) -> tuple[Tensor, TrainContext]:
        """A step's training input from a raw batch x [B, d_in]: x on the device in the SAE's dtype, times the
        input scale, and the step's TrainContext; NaN/Inf inputs are flagged in `self.finite` (no host sync)."""
        x = x.to(self.device, dtype=self.sae.W_enc.dtype, non_blocking=True)
        check_batch(x, self.sae.row_width, self.step)
        self.finite &= torch.isfinite(x).all()
        cfg = self.cfg
        lr_scale = lr_multiplier(self.step, cfg.total_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
        ctx = TrainContext(
            self.step,
            cfg.total_steps,
            self.tracker.dead_mask,
            self.any_dead,
            self.dead_latents,
            lr_scale=lr_scale,
        )
        return x * self.input_scale, ctx

    def autocast(self) -> torch.autocast:
        """The autocast context of the training forward (trainer.autocast_dtype; disabled when None)."""
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def apply_gradients(self, fired: Any, rows: int, inference_fired: Any = None) -> None:
        """The rest of a step once its loss's backward has filled the gradients: decoder-gradient projection,
        clipping, Adam, the SAE's after-step hooks, schedule, dead-latent bookkeeping. fired: the step's fired
        latents as `Distributed.any_fired` returns them; rows: this rank's batch rows; inference_fired: the same
        for the inference encoder's firing (`TrainOutput.inference_fired`; None: fired)."""
        cfg, sae = self.cfg, self.sae
        sae.before_optimizer_step()
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip_norm, foreach=True)
        self.optimizer.step()
        self.dist.sync_state(sae)
        sae.after_optimizer_step()
        self.scheduler.step()
        rows = rows * self.dist.world_size
        self.tracker.update(fired.result(), rows)
        self.inference_tracker.update((inference_fired or fired).result(), rows)
        self.step += 1

    def _metrics_row(self, out: Any, tokens_per_s: float) -> dict[str, float]:
        """The log row: step, tokens, lr, throughput, dead fraction, and the step's loss / L0 / variant metrics
        (averaged over ranks under torchrun)."""
        means = self.dist.mean_over_ranks({"loss": out.loss, "l0": out.l0, **out.metrics})
        row = {
            "step": float(self.step),
            "tokens": float(self.tracker.tokens_seen),
            "loss": means.pop("loss"),
            "l0": means.pop("l0"),
            "dead_frac": self.inference_tracker.dead_fraction(),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
            **means,
        }
        if not math.isfinite(row["loss"]):
            self.check_inputs_finite()
            raise FloatingPointError(
                f"training diverged: the loss became {row['loss']} at step {self.step} although every activation "
                f"batch was finite (the loss was last logged finite at step {self.loss_checked_at}). The learning "
                f"rate is likely too high (trainer.lr={self.cfg.lr}, in use {self.lr:.3g}); lower trainer.lr or "
                f"keep trainer.grad_clip_norm on. {self.checkpoint_note()}"
            )
        self.loss_checked_at = self.step
        return row

    # ------------------------------------------------------------ finiteness
    def check_inputs_finite(self) -> None:
        """Raise ValueError if a batch since the last check held NaN/Inf (one host sync, all ranks)."""
        if not self.dist.all_true(self.finite):
            raise ValueError(
                f"an activation batch between steps {self.inputs_checked_at} and {self.step} contains NaN or Inf; "
                f"check the activation source. {self.checkpoint_note()}"
            )
        self.inputs_checked_at = self.step

    def check_finite(self) -> None:
        """Before a save: raise unless every input since the last check and every weight and optimizer moment
        is finite (one host sync; a second one only to word the error)."""
        tensors = [p.detach() for p in self.sae.parameters()]
        for param_state in self.optimizer.state.values():
            tensors += [v for k, v in param_state.items() if k != "step" and torch.is_tensor(v)]
        weights_ok = torch.stack([t.isfinite().all() for t in tensors]).all()
        if self.dist.all_true(weights_ok & self.finite):
            self.inputs_checked_at = self.weights_checked_at = self.step
            return
        self.check_inputs_finite()
        raise FloatingPointError(
            f"training diverged: the SAE's weights or optimizer state became NaN or Inf between steps "
            f"{self.weights_checked_at} and {self.step} although every activation batch was finite. The learning "
            f"rate is likely too high (trainer.lr={self.cfg.lr}, in use {self.lr:.3g}); lower trainer.lr or keep "
            f"trainer.grad_clip_norm on. {self.checkpoint_note()}"
        )

    def checkpoint_note(self) -> str:
        """Which checkpoint a failed run leaves to resume from (each was checked finite before it was written)."""
        found = list_checkpoints(self.output_dir / "checkpoints") if self.output_dir is not None else []
        if not found:
            return "No checkpoint was written."
        return (
            f"No checkpoint was written after step {self.weights_checked_at}; the newest one, {found[-1]}, "
            "holds finite weights (resume from it with trainer.resume_from after fixing the cause)."
        )

    def save_for_later(self) -> str:
        """Checkpoint the run when it must stop early (the data ran out); returns a sentence saying so."""
        if self.step == 0 or self.output_dir is None:
            return "No checkpoint was written (nothing trained, or no output directory)."
        self.check_finite()
        path = self.save_checkpoint()
        return f"The {self.step} steps trained are saved in {path}: resume with trainer.resume_from."

    def data_record(self) -> dict[str, Any]:
        """What the SAE's metadata records of its data: the source's description and, for a source of indexed
        batches, `training_batches` {start, end, batch_size}, the indices trained on up to this step (and, for a
        live model source, contexts_read: the text read up to here)."""
        data = dict(self.data_metadata)
        if "training_batches" in data:
            data["training_batches"] = {**data["training_batches"], "end": self.heldout_offset + self.step}
            contexts = self.contexts_read()
            if contexts is not None:
                data["training_batches"]["contexts_read"] = contexts
        return data

    def contexts_read(self) -> int | None:
        """For a live model source, the text position (contexts) after everything this run's training stream has
        read, `ModelBatches.contexts_read`; before `fit` makes the stream, a resumed run's recorded position
        (None for other sources)."""
        return getattr(self.source_stream, "contexts_read", self.resume_contexts)

    def save_checkpoint(self, keep: int | None = None) -> Path | None:
        """Write checkpoints/step_<step>/ and prune all but the newest `keep` (default trainer.keep_checkpoints)."""
        if self.output_dir is None:
            return None
        data = self.data_record()
        record = {k: v for k, v in data.items() if k == "training_batches" or k not in self.sae.cfg.metadata}
        return save_checkpoint(
            self.output_dir / "checkpoints",
            self.step,
            self.sae,
            self.state_dict(),
            keep or self.cfg.keep_checkpoints,
            record,
        )

    def save_final(self, final: SAE) -> None:
        """Write the trained SAE to <output_dir>/sae; if that fails (a file appeared there, the disk is full),
        checkpoint the trained steps first, so none are lost, and raise saying where they are."""
        target = self.output_dir / SAE_FOLDER
        try:
            final.save(target)
        except Exception as err:
            try:
                note = self.save_for_later()
            except Exception as second:
                note = f"Saving a checkpoint failed too ({second}). {self.checkpoint_note()}"
            raise OSError(f"writing the trained SAE to {target} failed: {err}. {note}") from err

    def inference_sae(self) -> SAE:
        """A copy of the SAE that takes raw inputs (input scale folded into its weights)."""
        folded = type(self.sae)(self.sae.cfg, torch.Generator()).to(self.device)  # weights copied below
        folded.load_state_dict(self.sae.state_dict())
        folded.fold_input_scale(self.input_scale)
        folded.cfg.metadata = {**folded.cfg.metadata, "input_scale_folded": self.input_scale}
        return folded.eval()

    def _finish(self, logger: RunLogger, last_batch: Tensor) -> TrainResult:
        """Fold the input scale into the SAE, record its data and final figures, save it. The final fvu and l0
        are the saved SAE's on the run's last batch [B, d_in] (raw): for BatchTopK and Matryoshka its inference
        encoder (a threshold) differs from the training selection that the logged rows describe."""
        final = self.inference_sae()
        dead, window = self.inference_tracker.reported_dead()
        last = self.history[-1] if self.history else {}
        saved = heldout_metrics(final, [last_batch])
        final_metrics = {
            **({"loss": last["loss"]} if "loss" in last else {}),
            "fvu": saved["heldout/fvu"],
            "l0": saved["heldout/l0"],
            "dead_frac": dead,
        }
        if note := self.sae.missed_target_l0(final_metrics["l0"]):  # a target L0 the run did not reach
            warnings.warn(note, UserWarning, stacklevel=3)
        data = self.data_record()
        batches = data.pop("training_batches", None)  # this run's, over any a loaded SAE carried
        final.cfg.metadata = {
            **data,
            **final.cfg.metadata,
            **({"training_batches": batches} if batches is not None else {}),
            "training_tokens": self.tracker.tokens_seen,
            "final_metrics": final_metrics,
            "dead_window_tokens": window,
        }
        if self.output_dir is not None:
            self.save_final(final)
        logger.summary(
            {
                **{f"final/{k}": v for k, v in last.items()},  # the last logged row; the saved SAE's win
                **{f"final/{k}": v for k, v in final_metrics.items()},
                "final/dead_window_tokens": window,
                "final/base_lr": self.lr,
            }
        )
        return TrainResult(
            sae=final,
            steps=self.step,
            tokens=self.tracker.tokens_seen,
            input_scale=self.input_scale,
            base_lr=self.lr,
            dead_fraction=dead,
            dead_window_tokens=window,
            final_metrics=final_metrics,
            history=self.history,
            output_dir=self.output_dir,
            eval_history=self.eval_history,
        )
