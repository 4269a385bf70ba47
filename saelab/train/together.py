"""Many SAEs from one activation stream: `train_together(jobs, source)` trains every job's SAE on the same
batches, each exactly as its own run would train it, reading the data (running the model) once per step.

A job is (SAE config, trainer config, hook). Its SAE is built as `saelab train` builds it (the hook's width
filled in, the source's metadata recorded, `build_sae(cfg, generator(trainer.seed, "sae.init"))`) and trained
by its own `Trainer`: same init, same first batch for the input scale and the data-dependent init, same batches,
same optimiser, schedule, dead-latent window, logging, evaluation, checkpoints and final save. So each SAE
equals the one `Trainer.fit` trains alone on that hook's batches, to float rounding (bit for bit where it steps
alone; `saelab.train.stacked` batches same-shape TopK SAEs, whose sums then run in another order).

What every job must share, because it decides the one stream (`STREAM_SETTINGS`): batch size, total tokens,
device, held-out batches and checkpoint cadence (and, in the app, every source setting but the hook). Anything
else (the SAE, lr, warm-up, decay, AuxK settings, dead window, seed, logging) may differ.

Per step: one joint batch {hook: [B, d_hook]} (`saelab.sources.joint`); each SAE (or stack) steps on its hook's
rows. A job that fails (NaN inputs, a diverging loss, a bad config) stops alone: its `error.json` says why and
the others go on. Checkpoints are written for every job at the same steps; a job's previous one is pruned only
after every job wrote the new one, so a kill at any moment leaves a step all jobs hold, and a restart resumes
them all from the newest such step (`trainer.resume_from` per job).

Under torchrun, `parallel="data"` trains every SAE data-parallel (each rank its slice of every batch, as a
data-parallel `Trainer` does); `parallel="distribute"` spreads the SAEs over the ranks (`assign_ranks`), each
rank training its own SAEs on whole batches it reads itself, with no communication until the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from saelab.core.atomic import atomic_file
from saelab.core.device import resolve_device
from saelab.core.seeds import generator
from saelab.io.layout import FAILURE_FILE, STATE_FILE, list_checkpoints
from saelab.parallel import distributed
from saelab.sae.base import SAEConfig
from saelab.sae.registry import build_sae
from saelab.sources.joint import hook_views, joint_batches
from saelab.sources.registry import source_metadata
from saelab.train import lock
from saelab.train.config import LoggingConfig, TrainerConfig
from saelab.train.memory import check_group_fits
from saelab.train.preemption import TrainingStopped, catch_stop_signals, stop_requested
from saelab.train.stacked import TopKStack, plan_units, stack_limit, stack_sizes
from saelab.train.trainer import Trainer, TrainResult, check_fresh_output_dir, data_metadata

PARALLEL_MODES = ("data", "distribute")


@dataclass
class TogetherJob:
    """One SAE of a group trained together.

    sae: its config (d_in 0: the hook's width). trainer: its settings (`STREAM_SETTINGS` must agree across the
    group; trainer.resume_from: a run directory or checkpoint to continue). hook: whose activations (None: a
    source with one stream, e.g. planted features). output_dir, logging, run_config: as for `Trainer`. name:
    how messages name the job (default "job <index>").
    """

    sae: SAEConfig
    trainer: TrainerConfig
    hook: str | None = None
    output_dir: str | Path | None = None
    logging: LoggingConfig | None = None
    run_config: dict[str, Any] | None = None
    name: str | None = None


@dataclass
class JobFailure:
    """A job that stopped alone at `step` with `error` (its run directory's error.json says the same)."""

    name: str
    error: BaseException
    step: int

    def __str__(self) -> str:
        return f"{self.name} failed at step {self.step}: {type(self.error).__name__}: {self.error}"


def stream_settings(cfg: TrainerConfig) -> dict[str, Any]:
    """The trainer settings that decide the stream every job of a group reads (or its cadence), by field."""
    return {
        "trainer.batch_size": cfg.batch_size,
        "trainer.total_tokens": cfg.total_tokens,
        "trainer.device": cfg.device,
        "trainer.eval_every/eval_batches (batches held out)": cfg.eval_batches if cfg.eval_every else 0,
        "trainer.checkpoint_every": cfg.checkpoint_every,
    }


def disagreements(settings: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """For each field whose value differs between jobs: "field: value (jobs a, b); other (job c)"."""
    found = []
    for field in dict.fromkeys(key for row in settings for key in row):
        holders: dict[str, list[str]] = {}
        for row, name in zip(settings, names, strict=True):
            holders.setdefault(json.dumps(row.get(field), default=str), []).append(name)
        if len(holders) > 1:
            values = "; ".join(f"{value} ({', '.join(jobs)})" for value, jobs in holders.items())
            found.append(f"{field}: {values}")
    return found


def check_one_stream(settings: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Raise ValueError naming each setting (and its values per job) that differs between jobs trained
    together; `settings`: per job, field -> value of what decides the data stream."""
    diffs = disagreements(settings, names)
    if diffs:
        raise ValueError(
            "SAEs trained together read one activation stream, so the settings that decide it must agree "
            f"across the jobs, but they differ: {' | '.join(diffs)}. Give each one value, or train the jobs "
            "that differ as a sweep of their own (or with the basic launcher)."
        )


def assign_ranks(costs: Sequence[float], world: int) -> list[int]:
    """Spread jobs of the given costs over `world` ranks, largest first onto the least loaded rank (ties: the
    lowest rank) -> each job's rank."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[job] = rank
        load[rank] += costs[job]
    return owner


def checkpoint_steps(path: str | Path) -> dict[int, Path]:
    """{step: checkpoint} of a checkpoint folder, a checkpoints root or a run directory holding checkpoints/."""
    p = Path(path)
    found = [p] if (p / STATE_FILE).is_file() else list_checkpoints(p) or list_checkpoints(p / "checkpoints")
    return {int(c.name.rpartition("_")[2]): c for c in found}


def prune_checkpoints(output_dir: Path | None, keep: int, after: int | None = None) -> None:
    """Keep the newest `keep` complete checkpoints under output_dir/checkpoints (with `after`: delete instead
    those past that step, a restart's leftovers of a checkpoint round that not every job finished)."""
    if output_dir is None:
        return
    found = list_checkpoints(output_dir / "checkpoints")
    doomed = found[:-keep] if after is None else [c for c in found if int(c.name.rpartition("_")[2]) > after]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def record_failure(output_dir: Path | None, failure: JobFailure) -> None:
    """Write output_dir/error.json: the error's text, type and the step the job reached."""
    if output_dir is None:
        return
    record = {"error": str(failure.error), "type": type(failure.error).__name__, "step": failure.step}
    with atomic_file(output_dir / FAILURE_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def as_job(job: TogetherJob | tuple, index: int) -> TogetherJob:
    """A TogetherJob from itself or a (SAE config, trainer config[, hook]) tuple, named "job <index>"."""
    if not isinstance(job, TogetherJob):
        job = TogetherJob(*job)
    return job if job.name else dataclasses.replace(job, name=f"job {index}")


def train_together(
    jobs: Sequence[TogetherJob | tuple],
    source: Any,
    *,
    stack: str = "auto",
    parallel: str = "data",
    progress: bool = True,
) -> list[TrainResult | JobFailure | None]:
    """Train every job's SAE on one stream of `source`; returns, per job in order, its TrainResult (the SAE
    with the input scale folded in, as `Trainer.fit` returns it), a JobFailure for a job that stopped alone, or
    None for a job another rank trained (parallel="distribute").

    jobs: TogetherJob or (SAE config, TrainerConfig, hook) tuples. source: a source with `for_hooks` (a live
    model or cache source: one model pass / reader for every hook), a one-stream source (planted features:
    hook None), or {hook: source} whose batch b of each belongs together. stack: "auto" / "on" / "off",
    whether same-shape TopK SAEs on one hook step as one computation (`saelab.train.stacked`). parallel: under
    torchrun, "data" (every SAE data-parallel) or "distribute" (SAEs spread over the ranks).
    """
    # trainer.total_tokens 0: one pass over a cache (20M tokens of an endless source), as for a job alone
    resolved = [as_job(j, i) for i, j in enumerate(jobs)]
    resolved = [dataclasses.replace(j, trainer=j.trainer.for_source(source)) for j in resolved]
    return TogetherRun(resolved, source, stack, parallel, progress).run()


class TogetherRun:
    """The state of one `train_together` call: jobs, their trainers and loggers, the shared stream."""

    def __init__(self, jobs: list[TogetherJob], source: Any, stack: str, parallel: str, progress: bool):
        if not jobs:
            raise ValueError("train_together needs at least one job.")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={parallel!r} must be one of {list(PARALLEL_MODES)}.")
        for job in jobs:
            job.trainer.validate()
        names = [job.name or "" for job in jobs]
        check_one_stream([stream_settings(job.trainer) for job in jobs], names)
        self.jobs = jobs
        self.cfg = jobs[0].trainer  # its stream settings are every job's
        self.device = resolve_device(self.cfg.device)
        self.stack_limit = stack_limit(stack, self.device)
        ranks = distributed.setup(self.device)
        self.distribute = parallel == "distribute" and ranks.enabled
        self.trainer_ranks = distributed.Distributed() if self.distribute else None
        self.views = hook_views(source, [job.hook for job in jobs])
        self.sae_cfgs: list[SAEConfig | None] = [None] * len(jobs)
        self.results: list[TrainResult | JobFailure | None] = [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                self.sae_cfgs[i] = job.sae.resolved(self.views[job.hook].d_in)
                self.sae_cfgs[i].validate()
            except Exception as err:  # a bad config fails its job alone, as a sweep job alone would
                self.results[i] = JobFailure(names[i], err, 0)
        owners = [ranks.rank] * len(jobs)
        if self.distribute:
            owners = assign_ranks([c.d_in * c.d_sae if c else 0 for c in self.sae_cfgs], ranks.world_size)
        self.mine = [i for i in range(len(jobs)) if owners[i] == ranks.rank and self.results[i] is None]
        self.writes = ranks.is_main or self.distribute  # whether this process writes its jobs' folders
        self.is_main = ranks.is_main
        self.progress = progress and self.writes  # data-parallel ranks other than 0 stay quiet
        self.trainers: dict[int, Trainer] = {}
        self.job_of: dict[int, int] = {}  # id(trainer) -> job index
        self.loggers: dict[int, Any] = {}
        self.locked: list[Path] = []

    # ----------------------------------------------------------------- set-up
    def output_dir(self, i: int) -> Path | None:
        out = self.jobs[i].output_dir
        return Path(out) if out is not None and self.writes else None

    def fail(self, i: int, err: BaseException, step: int) -> None:
        """Stop job i alone: record why, close its logger, free its trainer and its run directory."""
        failure = JobFailure(self.jobs[i].name or f"job {i}", err, step)
        self.results[i] = failure
        record_failure(self.output_dir(i), failure)
        logger = self.loggers.pop(i, None)
        if logger is not None:
            logger.close()
        self.trainers.pop(i, None)
        out = self.output_dir(i)
        if out is not None and out in self.locked:
            lock.release(out)
            self.locked.remove(out)

    def in_place(self, i: int) -> bool:
        """Whether job i resumes from its own run directory (a restart, or trainer.resume_from on its folder)."""
        resume, out = self.jobs[i].trainer.resume_from, self.jobs[i].output_dir
        return bool(resume) and out is not None and Path(resume).resolve() == Path(out).resolve()

    def resume_step(self) -> tuple[int, dict[int, Path]]:
        """The step the group starts at, the newest step every job holds a checkpoint of (0 when a job has
        none: a fresh start), and each resuming job's checkpoint there. A job resuming from elsewhere next to a
        job that cannot resume is refused: the jobs step together."""
        found = {
            i: checkpoint_steps(self.jobs[i].trainer.resume_from)
            for i in self.mine
            if self.jobs[i].trainer.resume_from
        }
        newest = {i: max(steps, default=0) for i, steps in found.items()}
        step = min((newest.get(i, 0) for i in self.mine), default=0)
        if step == 0:
            elsewhere = [self.jobs[i].name for i in found if newest[i] and not self.in_place(i)]
            if elsewhere:
                fresh = [self.jobs[i].name for i in self.mine if not newest.get(i)]
                raise ValueError(
                    f"{', '.join(map(str, elsewhere))} would resume from a checkpoint (trainer.resume_from) but "
                    f"{', '.join(map(str, fresh))} have none: SAEs trained together step together; resume all of "
                    "them or none."
                )
            return 0, {}
        missing = [self.jobs[i].name for i, steps in found.items() if step not in steps]
        if missing:
            raise ValueError(
                f"SAEs trained together resume from one step, the newest every job holds (step {step}), but "
                f"{', '.join(map(str, missing))} have no checkpoint at that step (trainer.keep_checkpoints "
                "pruned it?); resume those jobs on their own, or all of them from an earlier common step."
            )
        return step, {i: steps[step] for i, steps in found.items()}

    def build(self) -> int:
        """Lock the run directories, check memory, build (or restore) every trainer of this rank; returns the
        step the group starts at."""
        for i, result in enumerate(self.results):  # a bad config: its folder says so (rank 0 writes)
            out = self.jobs[i].output_dir
            if isinstance(result, JobFailure) and out is not None and self.is_main:
                record_failure(Path(out), result)
        for i in self.mine:
            out = self.output_dir(i)
            if out is not None:
                lock.acquire(out)
                self.locked.append(out)
        step, checkpoints = self.resume_step()
        for i in self.mine:  # a restart in place drops the rest of a checkpoint round not every job finished
            if self.in_place(i):
                prune_checkpoints(self.output_dir(i), 0, after=step)
        names = [self.jobs[i].name or "" for i in self.mine]
        cfgs = [self.sae_cfgs[i] for i in self.mine]
        shapes = Counter(
            (self.jobs[i].hook, c.d_in, c.d_sae, getattr(c, "k", 0))
            for i, c in zip(self.mine, cfgs, strict=True)
            if c.architecture == "topk" and self.stack_limit != 0
        )
        batch, limit = self.cfg.batch_size, self.stack_limit
        stacks = [
            size for (_, _, n, _), count in shapes.items() for size in stack_sizes(count, batch, n, limit)
        ]
        if cfgs:
            check_group_fits(names, cfgs, batch, self.device, stacks)
        for i in self.mine:
            try:
                self.trainers[i] = self.make_trainer(i, checkpoints.get(i))
                self.job_of[id(self.trainers[i])] = i
                out = self.output_dir(i)
                if out is not None:  # a job retried from its checkpoint: its earlier failure record goes
                    (out / FAILURE_FILE).unlink(missing_ok=True)
                if step == 0:
                    check_fresh_output_dir(self.trainers[i].output_dir)
            except Exception as err:
                self.fail(i, err, step)
        return step

    def make_trainer(self, i: int, checkpoint: Path | None) -> Trainer:
        job, cfg = self.jobs[i], self.sae_cfgs[i]
        trainer_cfg = (
            dataclasses.replace(job.trainer, resume_from=None) if checkpoint is None else job.trainer
        )
        logging = dataclasses.replace(job.logging or LoggingConfig(), progress=False)  # one bar for all
        args = (trainer_cfg, logging, job.output_dir, job.run_config)
        if checkpoint is not None:
            return Trainer.from_checkpoint(checkpoint, *args, sae_config=cfg, ranks=self.trainer_ranks)
        cfg = dataclasses.replace(cfg, metadata={**source_metadata(self.views[job.hook]), **cfg.metadata})
        sae = build_sae(cfg, generator(job.trainer.seed, "sae.init"))
        return Trainer(sae, *args, ranks=self.trainer_ranks)

    # ------------------------------------------------------------------ run
    def run(self) -> list[TrainResult | JobFailure | None]:
        try:
            start = self.build()
            if self.trainers:
                with catch_stop_signals():
                    self.train_from(start)
        finally:
            for logger in self.loggers.values():
                logger.close()
            for out in self.locked:
                lock.release(out)
            self.locked = []
        if self.distribute:
            distributed.barrier()  # every rank's jobs written before any rank reads the sweep's folders
        return self.results

    def hooks(self) -> dict[int, str | None]:
        return {i: self.jobs[i].hook for i in self.trainers}

    def index(self, trainer: Trainer) -> int:
        """The job index of a trainer (live or just failed)."""
        return self.job_of[id(trainer)]

    def plan(self) -> list[tuple[Any, Any]]:
        """The units a step runs, for the trainers still training."""
        return plan_units(list(self.trainers.values()), list(self.hooks().values()), self.stack_limit)

    def train_from(self, start: int) -> None:
        cfg, total = self.cfg, self.cfg.total_steps
        views = {hook: self.views[hook] for hook in dict.fromkeys(self.hooks().values())}
        any_trainer = next(iter(self.trainers.values()))
        offset = any_trainer.heldout_offset
        if offset:
            for i, trainer in self.trainers.items():
                trainer.check_heldout_fits(self.views[self.jobs[i].hook])
            held = joint_batches(views, cfg.batch_size, 0)
            batches = [next(held) for _ in range(offset)]
            held.close()
            for i, trainer in self.trainers.items():
                trainer.heldout = [b[self.jobs[i].hook].to(trainer.device) for b in batches]
        contexts = next(
            (t.resume_contexts for t in self.trainers.values() if t.resume_contexts is not None), None
        )
        stream = joint_batches(views, cfg.batch_size, start + offset, offset, contexts)
        pending = [next(stream)] if start == 0 else []
        for i, trainer in list(self.trainers.items()):
            view = self.views[self.jobs[i].hook]
            trainer.data_metadata = data_metadata(view, offset, cfg.batch_size)
            if getattr(stream, "contexts_read", None) is not None:
                trainer.source_stream = stream
            try:
                if start == 0:
                    trainer.prepare(pending[0][self.jobs[i].hook])
                trainer.input_scale = trainer.dist.broadcast_start(trainer.sae, trainer.input_scale)
                self.loggers[i] = trainer.open_run()
            except Exception as err:
                self.fail(i, err, start)
        units = self.plan()
        desc = f"{len(self.trainers)} SAEs"
        bar = tqdm(total=total, initial=start, disable=not self.progress, unit="step", desc=desc)
        step, batch = start, pending[0] if pending else None
        window = time.perf_counter()
        try:
            while step < total and self.trainers:
                try:
                    batch = pending.pop() if pending else next(stream)
                except StopIteration:
                    self.exhausted(step - start, step)
                    break
                failed = self.step_units(units, batch, step)
                step += 1
                bar.update()
                if failed:
                    units = self.plan()
                if self.trainers:
                    self.checkpoint_or_stop(step)
                if step % cfg.log_every == 0:
                    rate = cfg.log_every * cfg.batch_size / max(time.perf_counter() - window, 1e-9)
                    bar.set_postfix(
                        {"tokens_per_s": f"{rate:.4g}", "training": len(self.trainers)}, refresh=False
                    )
                    window = time.perf_counter()
            if batch is not None:
                self.finish_all(batch, step)
        finally:
            bar.close()
            if hasattr(stream, "close"):
                stream.close()

    def step_units(self, units: list[tuple[Any, Any]], batch: dict[Any, Tensor], step: int) -> bool:
        """One step of every unit (a trainer or a stack) on its hook's rows; returns whether a job failed."""
        failed = False
        for hook, unit in units:
            x = batch[hook]
            members = unit.trainers if isinstance(unit, TopKStack) else [unit]
            try:
                outs = (
                    unit.train_step(x)
                    if isinstance(unit, TopKStack)
                    else [unit.train_step(unit.dist.shard(x))]
                )
            except Exception as err:
                for trainer in members:
                    self.fail(self.index(trainer), err, step)
                failed = True
                continue
            for trainer, out in zip(members, outs, strict=True):
                i = self.index(trainer)
                try:
                    trainer.record_step(out, x.shape[0], self.loggers[i])
                except Exception as err:
                    self.fail(i, err, trainer.step)
                    failed = True
        return failed

    def checkpoint_or_stop(self, step: int) -> None:
        """After `step`: a checkpoint round when the trainers' settings ask for one (steps, minutes) or a stop
        signal was caught (`Trainer.checkpoint_decision`; every job shares the trainer settings), then
        TrainingStopped on a signal, so that a preempted sweep resumes every job from here."""
        leader = next(iter(self.trainers.values()))
        due, stop = leader.checkpoint_decision()
        if not due:
            return
        self.checkpoint_round(step)
        for trainer in self.trainers.values():
            trainer.clock.restart()
        if stop:
            raise TrainingStopped(stop_requested() or signal.SIGTERM, step, None, None)

    def checkpoint_round(self, step: int) -> None:
        """Checkpoint every job at `step`, then prune: until all are written, each keeps its previous one."""
        for i, trainer in list(self.trainers.items()):
            try:
                trainer.check_finite()
                trainer.save_checkpoint(keep=trainer.cfg.keep_checkpoints + 1)
            except Exception as err:
                self.fail(i, err, step)
        for trainer in self.trainers.values():
            prune_checkpoints(trainer.output_dir, trainer.cfg.keep_checkpoints)

    def exhausted(self, served: int, step: int) -> None:
        """The source ran out before the last step: checkpoint what was trained and fail every job, naming it."""
        needed = self.cfg.total_steps
        for i, trainer in list(self.trainers.items()):
            message = (
                f"the source ran out after {served} batches, but this run needs {needed} "
                f"(trainer.total_tokens={self.cfg.total_tokens:,} in batches of {self.cfg.batch_size}); pass more "
                f"batches or lower trainer.total_tokens. {trainer.save_for_later()}"
            )
            self.fail(i, ValueError(message), step)

    def finish_all(self, batch: dict[Any, Tensor], step: int) -> None:
        """Save every job's final SAE (`Trainer._finish` on its hook's last batch)."""
        for i, trainer in list(self.trainers.items()):
            try:
                trainer.check_finite()
                self.results[i] = trainer._finish(self.loggers[i], batch[self.jobs[i].hook])
            except Exception as err:
                self.fail(i, err, step)
                continue
            self.loggers.pop(i).close()
