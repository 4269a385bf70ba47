"""`saelab train -m hydra/launcher=together <sweep>`: every job of a sweep trained in this one process on one
activation stream (`saelab.train.together`), each job with the run folder, `.hydra/` record, checkpoints, wandb
run, `summary.json` and printed line a job of the basic launcher gets.

Hydra instantiates the launcher from `hydra/launcher/together.yaml` (a plugin in the `hydra_plugins` namespace, as Hydra
requires, that hands over to `TogetherLaunch`). `launch` composes every job's config as the
basic launcher does, checks before anything is written that the jobs agree on what decides the stream (every
source setting but the hook; trainer batch size, tokens, device, held-out batches, checkpoint cadence: naming
each setting that differs with its values per job), writes each job's folder and `.hydra/` with Hydra's own
`run_job` (its task only records the job), then loads the source once (the model once: every hook some job
needs is captured in one pass) and trains all jobs together. A restart resumes every job from its folder:
`trainer.resume_from=<sweep dir>` (each job continues from `<sweep dir>/<its folder>`; in place with
`hydra.sweep.dir=<sweep dir>`), a SLURM requeue or a torchrun restart (as `saelab.app.train_job.restarted_run`);
jobs already done there are left as they are (and, on a restart, the failed ones).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from saelab.app.config import sae_config, to_dataclass
from saelab.app.hydra_callbacks import _drop_file_handlers
from saelab.app.sweep import RUN_SUMMARY, sweep_logging
from saelab.app.train_job import (
    RESTART_COUNTERS,
    restarted_run,
    summary_line,
    with_resolved_sizes,
    write_summary,
)
from saelab.core.device import resolve_device
from saelab.core.seeds import derive_seed
from saelab.parallel import distributed
from saelab.sae.base import SAEConfig
from saelab.sources import build_source
from saelab.train.config import LoggingConfig, TrainerConfig
from saelab.train.stacked import STACK_MODES
from saelab.train.together import (
    FAILURE_FILE,
    PARALLEL_MODES,
    JobFailure,
    TogetherJob,
    check_one_stream,
    stream_settings,
    train_together,
)

log = logging.getLogger(__name__)

#: Source fields that only say where to read from, not what: they may differ between jobs trained together.
HOOK_FIELD = "hook_name"


@dataclass
class JobSpec:
    """One job of the sweep: its number, run folder, composed config (with `hydra`) and what training needs."""

    num: int
    output_dir: Path
    config: DictConfig
    sae: SAEConfig
    source: Any
    trainer: TrainerConfig
    logging: LoggingConfig
    run_config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"job {self.num}"

    @property
    def hook(self) -> str | None:
        return getattr(self.source, HOOK_FIELD, None)


def job_output_dir(config: DictConfig) -> str:
    """The run folder `hydra.core.utils.run_job` gives a sweep job: <hydra.sweep.dir>/<hydra.sweep.subdir>."""
    return os.path.abspath(
        os.path.join(
            str(OmegaConf.select(config, "hydra.sweep.dir")),
            str(OmegaConf.select(config, "hydra.sweep.subdir")),
        )
    )


def describe_job(config: DictConfig) -> JobSpec:
    """A sweep job's spec, resolved under its own HydraConfig as `run_job` would set it (run folder, ${hydra:...}
    values, the sweep's wandb group and name), without writing anything."""
    hydra = HydraConfig.instance()
    saved = hydra.cfg
    try:
        hydra.set_config(config)
        output_dir = job_output_dir(config)
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = output_dir
        hydra.set_config(config)
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return JobSpec(
            num=int(config.hydra.job.num),
            output_dir=Path(output_dir),
            config=config,
            sae=sae_config(task.sae),
            source=to_dataclass(task.source, "source"),
            trainer=to_dataclass(task.trainer, "trainer"),
            logging=sweep_logging(to_dataclass(task.logging, "logging")),
            run_config=OmegaConf.to_container(task, resolve=True),
        )
    finally:
        hydra.cfg = saved


def check_specs(specs: Sequence[JobSpec]) -> None:
    """Refuse (naming each setting and its values per job) jobs that cannot share one activation stream: any
    source setting but the hook, or a trainer setting of `stream_settings`, that differs between them."""
    if not all(hasattr(spec.trainer, "batch_size") and isinstance(spec.sae, SAEConfig) for spec in specs):
        raise ValueError("hydra/launcher=together trains SAEs: use it with `saelab train -m ...`.")
    settings = []
    for spec in specs:
        source = {k: v for k, v in spec.run_config["source"].items() if k != HOOK_FIELD}
        settings.append({**{f"source.{k}": v for k, v in source.items()}, **stream_settings(spec.trainer)})
    check_one_stream(settings, [spec.name for spec in specs])


def resume_target(spec: JobSpec, env: dict[str, str]) -> str | None:
    """Where a job continues from: trainer.resume_from (a sweep folder means this job's folder inside it), or
    its own run folder when this is a restart (a SLURM requeue or torchrun restart); None: a fresh job."""
    resume = spec.trainer.resume_from
    if resume:
        inside = Path(resume) / spec.output_dir.name
        return str(inside) if inside.is_dir() else resume
    restarted = restarted_run(spec.output_dir, env)
    return str(restarted) if restarted is not None else None


def finished_outcome(
    spec: JobSpec, resume: str | None, env: dict[str, str]
) -> dict[str, Any] | JobFailure | None:
    """A job resumed in its own folder, or restarted (a requeue), that already finished there: its summary
    (done); for a restart also a job that failed there (its failure record: a requeue does not retry it, an
    explicit trainer.resume_from does); None otherwise (it trains)."""
    restarted = any(env.get(name, "0").isdigit() and int(env.get(name, "0")) > 0 for name in RESTART_COUNTERS)
    in_place = resume is not None and Path(resume).resolve() == spec.output_dir.resolve()
    if not (in_place or restarted):
        return None
    summary, failure = spec.output_dir / RUN_SUMMARY, spec.output_dir / FAILURE_FILE
    if summary.is_file() and (spec.output_dir / "sae").is_dir():
        return json.loads(summary.read_text())
    if restarted and failure.is_file():
        record = json.loads(failure.read_text())
        return JobFailure(spec.name, RuntimeError(record.get("error", "failed")), int(record.get("step", 0)))
    return None


def train_specs(specs: Sequence[JobSpec], stack: str, parallel: str) -> list[Any]:
    """Train the sweep's jobs together; per job its outcome: a summary dict (done), a JobFailure, or None
    (trained by another rank, whose folder tells)."""
    first = specs[0]
    device = resolve_device(first.trainer.device)
    torch.manual_seed(derive_seed(first.trainer.seed, "torch.global"))  # as train_from_config
    env = dict(os.environ)
    resumes = [resume_target(spec, env) for spec in specs]
    outcomes: list[Any] = [
        finished_outcome(spec, resume, env) for spec, resume in zip(specs, resumes, strict=True)
    ]
    todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if not todo:
        return outcomes
    source = build_source(first.source, device)  # one model (or cache reader); every hook joins it below
    jobs = [
        TogetherJob(
            spec.sae,
            # total_tokens 0: one pass over a cache, as for a job alone
            dataclasses.replace(spec.trainer, resume_from=resume).for_source(source),
            spec.hook,
            spec.output_dir,
            spec.logging,
            spec.run_config,
            spec.name,
        )
        for spec, resume in zip(specs, resumes, strict=True)
    ]
    progress = any(spec.logging.progress for spec in specs)
    results = train_together(
        [jobs[i] for i in todo], source, stack=stack, parallel=parallel, progress=progress
    )
    for i, result in zip(todo, results, strict=True):
        spec = specs[i]
        if isinstance(result, JobFailure) or result is None:
            outcomes[i] = result
            if isinstance(result, JobFailure):
                log.error("%s (%s) %s", spec.name, " ".join(job_overrides(spec)), result)
            continue
        if result.output_dir is None:  # a data-parallel rank other than 0: rank 0 writes
            outcomes[i] = {}
            continue
        run_config = with_resolved_sizes(spec.run_config, result.sae.cfg, jobs[i].trainer)
        summary = write_summary(result.output_dir / RUN_SUMMARY, result, source, run_config)
        print(summary_line(summary, result.output_dir))
        outcomes[i] = {k: v for k, v in summary.items() if k != "config"}
    return outcomes


def job_overrides(spec: JobSpec) -> list[str]:
    return list(filter_overrides(OmegaConf.to_container(spec.config.hydra.overrides.task)))


def folder_outcome(spec: JobSpec) -> dict[str, Any] | JobFailure:
    """A job another rank trained, by what it left in its folder."""
    if (spec.output_dir / RUN_SUMMARY).is_file():
        return {
            k: v for k, v in json.loads((spec.output_dir / RUN_SUMMARY).read_text()).items() if k != "config"
        }
    record = (
        json.loads((spec.output_dir / FAILURE_FILE).read_text())
        if (spec.output_dir / FAILURE_FILE).is_file()
        else {}
    )
    return JobFailure(
        spec.name, RuntimeError(record.get("error", "no summary.json was written")), record.get("step", 0)
    )


class TogetherLaunch:
    """What `hydra/launcher=together` does (its Hydra plugin, `hydra_plugins.saelab_together.TogetherLauncher`,
    hands over to this; see the module docstring).

    stack: "auto" / "on" / "off", whether same-shape TopK SAEs on one hook step as one batched computation
    ("auto": what was measured faster on the device). parallel: under torchrun, "data" (every SAE data-parallel
    on the shared stream) or "distribute" (the SAEs spread over the ranks, each on whole batches).
    """

    def __init__(self, stack: str = "auto", parallel: str = "data") -> None:
        if stack not in STACK_MODES:
            raise ValueError(f"hydra.launcher.stack={stack!r} must be one of {list(STACK_MODES)}.")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"hydra.launcher.parallel={parallel!r} must be one of {list(PARALLEL_MODES)}.")
        self.stack, self.parallel = stack, parallel
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.ranks = distributed.Distributed()
        self.sweep_dir: str | None = None  # under torchrun: rank 0's, for every rank's jobs

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        if distributed.env_world_size() > 1:  # torchrun: every rank uses rank 0's sweep folder
            device = resolve_device(str(OmegaConf.select(config, "trainer.device", default="auto")))
            self.ranks = distributed.setup(device)
            self.sweep_dir = self.ranks.broadcast_object(str(config.hydra.sweep.dir))
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = self.sweep_dir  # where the sweeper writes multirun.yaml

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        configs = []
        for idx, overrides in enumerate(job_overrides):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = initial_job_idx + idx
                if self.sweep_dir is not None:  # each job's config is composed again, with its own ${now:...}
                    config.hydra.sweep.dir = self.sweep_dir
            configs.append(config)
        specs = [describe_job(config) for config in configs]
        check_specs(specs)  # before any folder is written
        log.info(f"Training {len(specs)} jobs together on one activation stream")
        records = []
        for spec in specs:
            records.append(self.record(spec))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # as the basic launcher
        outcomes = train_specs(specs, self.stack, self.parallel)
        distributed.barrier()  # under torchrun: every rank's files are written before any rank sums the sweep up
        returns = []
        for spec, record, outcome in zip(specs, records, outcomes, strict=True):
            outcome = folder_outcome(spec) if outcome is None else outcome
            failed = isinstance(outcome, JobFailure)
            record.status = JobStatus.FAILED if failed else JobStatus.COMPLETED
            record.return_value = outcome.error if failed else outcome
            returns.append(record)
        return returns

    def record(self, spec: JobSpec) -> JobReturn:
        """The job's folder and `.hydra/` record, written by Hydra's own `run_job` exactly as the basic launcher's
        (only rank 0 writes under torchrun); its task records the job instead of training it."""
        log.info(f"\t#{spec.num} : {' '.join(job_overrides(spec))}")
        if not self.ranks.is_main:
            with read_write(spec.config.hydra), open_dict(spec.config.hydra):
                spec.config.hydra.output_subdir = None
                _drop_file_handlers(spec.config.hydra.job_logging)
        assert self.hydra_context is not None
        return run_job(
            hydra_context=self.hydra_context,
            task_function=lambda cfg: None,
            config=spec.config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
