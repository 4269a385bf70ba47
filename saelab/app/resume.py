"""`saelab train trainer.resume_from=DIR` continues the run in DIR, in DIR.

- `resume_arguments(argv)`, before Hydra parses the command line: a resume path is passed to Hydra quoted, so a
  sweep job's folder name (`3_sae.k=16,trainer.lr=0.001`, whose `=` and `,` Hydra would read as syntax) works as
  typed; and, for a single run (not `-m`), the run's recorded overrides (`<run dir>/.hydra/overrides.yaml`) come
  first, so the resumed run has the settings it was started with; the command line's own overrides win, key by
  key (only the safe ones may differ, `saelab.train.resume`).
- `resume_in_place(config)`, when Hydra starts the run (the SharedRunDir callback): the run directory becomes
  the resumed run's own (unless `hydra.run.dir` is on the command line), and Hydra's record of this resume goes
  to `<run dir>/.hydra/resume-<time>/`, beside the original record in `.hydra/`, which stays as it was.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from saelab.io.checkpoint import resolve_checkpoint

RESUME_KEY = "trainer.resume_from"
RECORD = Path(".hydra") / "overrides.yaml"


def checkpoint_run_dir(resume_from: str | Path) -> Path | None:
    """The run directory whose checkpoints `resume_from` (a run dir, its checkpoints/ folder or one checkpoint)
    holds: the folder above `checkpoints/`. None where there is no checkpoint or no such folder."""
    try:
        ckpt = resolve_checkpoint(resume_from)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def hydra_quote(value: str) -> str:
    """`value` as a Hydra quoted string (taken literally: `=`, `,`, spaces and brackets lose their meaning)."""
    quote = "'" if "'" not in value or '"' in value else '"'
    return quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def override_key(argument: str) -> str | None:
    """The config key (or group) an override sets; None for what is not an override (flags, their values)."""
    if argument.startswith("-") or ("=" not in argument and not argument.startswith("~")):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(argument).key_or_group
    except HydraException:
        return None


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def resume_arguments(argv: list[str]) -> list[str]:
    """`saelab train`'s arguments with the resume path quoted for Hydra and, for a single run, the resumed run's
    recorded overrides in front (see the module docstring)."""
    args, resume = [], None
    for argument in argv:
        if argument.startswith(RESUME_KEY + "="):
            value = argument.split("=", 1)[1]
            resume = _unquoted(value)
            if value == resume and Path(value).exists():  # an existing path typed as it is
                argument = f"{RESUME_KEY}={hydra_quote(value)}"
        args.append(argument)
    run_dir = checkpoint_run_dir(resume) if resume else None
    if run_dir is None or "-m" in argv or "--multirun" in argv or not (run_dir / RECORD).is_file():
        return args
    recorded = OmegaConf.to_container(OmegaConf.load(run_dir / RECORD))
    given = {override_key(a) for a in args} | {RESUME_KEY}
    return [str(o) for o in recorded if override_key(str(o)) not in given] + args


def resume_in_place(config: DictConfig) -> Path | None:
    """Point a single run's Hydra run directory at the run it resumes, and its Hydra record at a subfolder of
    that run's `.hydra/` (see the module docstring); returns the run directory (None: left as it was)."""
    resume = OmegaConf.select(config, RESUME_KEY, default=None)
    explicit = any(override_key(str(o)) == "hydra.run.dir" for o in config.hydra.overrides.hydra)
    run_dir = checkpoint_run_dir(resume) if resume and not explicit else None
    if run_dir is None:
        return None
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = str(run_dir)
        if config.hydra.output_subdir is not None:
            config.hydra.output_subdir = str(Path(".hydra") / time.strftime("resume-%Y-%m-%d_%H-%M-%S"))
    return run_dir
