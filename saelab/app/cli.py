"""`saelab <command> [hydra overrides]`: each command is a Hydra app over the `configs/` tree."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

import saelab.app.resolvers  # noqa: F401  (registers the resolvers the configs use)

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
            app()
            from saelab.parallel.distributed import finish

            finish()  # under torchrun: all ranks end together (a failed rank exits without waiting)
        finally:
            sys.argv = saved

    return command


def check_not_multirun_under_torchrun(argv: list[str]) -> None:
    """Refuse `-m` under torchrun before Hydra starts (Hydra turns a callback's error into a warning): every rank
    would launch the whole sweep."""
    from saelab.parallel.distributed import env_world_size

    if env_world_size() > 1 and any(a in ("-m", "--multirun") for a in argv):
        raise SystemExit(
            "a Hydra multirun (-m) cannot run under torchrun: every rank would launch the whole sweep. Run the "
            "sweep with one process per job (locally, or on SLURM with hydra/launcher=slurm and "
            "hydra.launcher.tasks_per_node=hydra.launcher.gpus_per_node for data-parallel jobs), or call "
            "torchrun once per configuration."
        )


def _train(cfg: DictConfig) -> object:
    from saelab.app.train_job import train_from_config

    return train_from_config(cfg)


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


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": hydra_app("config", _train),
    "eval": _eval_command,
    "harvest": hydra_app("harvest", _harvest),
    "inspect": _inspect_command,
    "inspect-serve": _inspect_serve,
    "inspect-explain": _inspect_explain,
    "fetch-assets": _fetch_assets,
    "sweep-summary": _sweep_summary,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `saelab` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(
            f"usage: saelab <command> [hydra overrides]\ncommands: {names}\n"
            "example: saelab train sae=topk sae.k=32 trainer.lr=1e-3",
            file=sys.stderr,
        )
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    main()
