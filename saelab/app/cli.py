"""`saelab <command> [hydra overrides]`: each command is a Hydra app over the `configs/` tree.

A failing command prints its error's message alone and exits 1: a bad setting, a missing file, a refused
target explain themselves (the message names the field and the fix); `SAELAB_DEBUG=1` (or Hydra's
`HYDRA_FULL_ERROR=1`) shows the full traceback instead. Unexpected errors (a bug) always show it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

import saelab.app.resolvers  # noqa: F401  (registers the resolvers the configs use)
from saelab.train.preemption import TrainingStopped

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def hydra_app(config_name: str, task: Callable[[DictConfig], object]) -> Callable[[list[str]], None]:
    """Wrap `task(cfg)` as a command that parses `argv` with Hydra (overrides, -m multirun, --cfg job, ...)."""

    def command(argv: list[str]) -> None:
        from saelab.app.config import register_configs

        check_not_multirun_under_torchrun(argv)
        register_configs()
        app = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base=None)(task)
        saved = sys.argv
        sys.argv = [f"saelab {config_name}", *argv]
        try:
            with errors_reported():
                app()
            from saelab.parallel.distributed import finish

            finish()  # under torchrun: all ranks end together (a failed rank exits without waiting)
        finally:
            sys.argv = saved

    return command


#: Built-in error types saelab raises for conditions it explains (bad values, missing or refused files, a
#: diverged run, too little memory); errors of classes saelab defines are explained too.
EXPLAINED = (ValueError, TypeError, OSError, FloatingPointError, MemoryError)


def debugging() -> bool:
    """Whether the user asked for tracebacks: SAELAB_DEBUG set (not 0), or Hydra's HYDRA_FULL_ERROR=1."""
    return os.environ.get("SAELAB_DEBUG", "0") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"


def explained(err: BaseException) -> bool:
    """Whether `err` explains itself: a config error of Hydra / OmegaConf, an EXPLAINED type, or a saelab class."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    own = type(err).__module__.startswith("saelab.")
    return own or isinstance(err, (*EXPLAINED, HydraException, OmegaConfBaseException))


def error_message(err: BaseException) -> str:
    """The text to print for an explained error; a missing config option lists the group's real choices (not
    the `*_schema` entries that type-check them)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, MissingConfigException) and err.options is not None:
        choices = sorted(o for o in err.options if not o.endswith("_schema"))
        return f"{str(err).splitlines()[0]}; choose one of: {', '.join(choices)}"
    cause = err.__cause__
    return f"{err}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(err)


@contextlib.contextmanager
def errors_reported() -> Iterator[None]:
    """Inside: Hydra raises errors instead of printing them (HYDRA_FULL_ERROR=1); an explained one is printed
    alone and ends the process with exit code 1 (unless `debugging`, which re-raises it)."""
    debug = debugging()
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as err:
        if debug or not explained(err):
            raise
        print(f"error: {error_message(err)}\n(set SAELAB_DEBUG=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def check_not_multirun_under_torchrun(argv: list[str]) -> None:
    """Refuse `-m` under torchrun before Hydra starts (Hydra turns a callback's error into a warning): every rank
    would launch the whole sweep."""
    from saelab.parallel.distributed import env_world_size

    together = any(a.startswith("hydra/launcher=together") for a in argv)  # one process trains every job
    if env_world_size() > 1 and any(a in ("-m", "--multirun") for a in argv) and not together:
        raise SystemExit(
            "a Hydra multirun (-m) cannot run under torchrun: every rank would launch the whole sweep. Run the "
            "sweep with one process per job (locally, or on SLURM with hydra/launcher=slurm and "
            "hydra.launcher.tasks_per_node=hydra.launcher.gpus_per_node for data-parallel jobs), call "
            "torchrun once per configuration, or train the sweep's jobs together (hydra/launcher=together)."
        )


def _train(cfg: DictConfig) -> object:
    from saelab.app.train_job import train_task

    try:
        return train_task(cfg)
    except TrainingStopped as stopped:  # its line is printed: end as the signal asked, without a traceback
        raise SystemExit(128 + stopped.signum) from None


def _train_command(argv: list[str]) -> None:
    """`saelab train ...`: a resume path is taken as typed, and a resumed run keeps its recorded overrides
    (`saelab.app.resume`)."""
    from saelab.app.resume import resume_arguments

    hydra_app("config", _train)(resume_arguments(argv))


def _eval(cfg: DictConfig) -> object:
    from saelab.app.eval_job import evaluate_from_config

    return evaluate_from_config(cfg)


def _eval_command(argv: list[str]) -> None:
    """`saelab eval sae=PATH ...`: `sae` is also a config group name, so `sae=` is passed on as `sae_path=`."""
    hydra_app("eval", _eval)([f"sae_path={a[4:]}" if a.startswith("sae=") else a for a in argv])


def _inspect(cfg: DictConfig) -> object:
    from saelab.app.inspect_job import inspect_from_config

    return inspect_from_config(cfg)


def _inspect_command(argv: list[str], preset: tuple[str, ...] = ()) -> None:
    """`saelab inspect sae=PATH ...`: like `saelab eval`, `sae=` is passed on as `sae_path=`; `preset`
    overrides come first, so the command line can still change them."""
    args = [f"sae_path={a[4:]}" if a.startswith("sae=") else a for a in argv]
    hydra_app("inspect", _inspect)([*preset, *args])


def _inspect_serve(argv: list[str]) -> None:
    """`saelab inspect-serve sae=PATH source=...`: serve the written site with the text box, no collection."""
    _inspect_command(argv, ("collect=false", "serve=true"))


def _inspect_explain(argv: list[str]) -> None:
    """`saelab inspect-explain output_dir=SITE explain.explainer=...`: explain a written site's latents."""
    _inspect_command(argv, ("collect=false",))


def _harvest(cfg: DictConfig) -> object:
    from saelab.app.harvest_job import harvest_from_config

    return harvest_from_config(cfg)


def _fetch_assets(argv: list[str]) -> None:
    from saelab.data.assets import main as fetch_main

    fetch_main(argv)


def _sweep_summary(argv: list[str]) -> None:
    from saelab.app.sweep import main as sweep_main

    sweep_main(argv)


def _sweep_resubmit(argv: list[str]) -> None:
    from saelab.app.resubmit import main as resubmit_main

    resubmit_main(argv, hydra_app("config", _train))


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": _train_command,
    "eval": _eval_command,
    "harvest": hydra_app("harvest", _harvest),
    "inspect": _inspect_command,
    "inspect-serve": _inspect_serve,
    "inspect-explain": _inspect_explain,
    "fetch-assets": _fetch_assets,
    "sweep-summary": _sweep_summary,
    "sweep-resubmit": _sweep_resubmit,
}


#: Measured run times and sizes (README.md, "Run times and disk sizes"; dates in docs/getting-started.md).
RUN_TIMES = """run times (2-core CPU, mostly shared with other jobs; docs/getting-started.md has the dates):
  saelab train (the default job: 4M planted tokens)      46 s on an idle CPU, 144 s shared; not timed on a GPU
  saelab harvest source=smollm2 total_tokens=262144      19.8 min (one hook)
  saelab train source=cache (4608 latents, 524k tokens)  5.8 min; saelab eval source=smollm2 (8192 tokens) 7.4 min
  saelab train source=smollm2 (live model)               347 tokens/s on the CPU: harvest once, train from the cache
  one TopK training step on one H200 GPU                 4.6 ms (d_in 768, 32,768 latents, k 32, batch 8192)
harvest size on disk, SmolLM2 float32 (dtype=bfloat16 halves it):
  100k tokens x 2 hooks 461 MB; 2M tokens x 1 hook 4.6 GB; 2M x 2 hooks 9.2 GB; 50M x 1 hook 115 GB"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `saelab` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(
            f"usage: saelab <command> [hydra overrides]\ncommands: {names}\n"
            f"example: saelab train sae=topk sae.k=32 trainer.lr=1e-3\n{RUN_TIMES}",
            file=sys.stderr,
        )
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    main()
