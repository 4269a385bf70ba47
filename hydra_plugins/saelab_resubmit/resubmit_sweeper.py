"""`hydra/sweeper=saelab_resubmit`: launch the jobs `saelab sweep-resubmit` planned (saelab.app.resubmit), each
with its own overrides, in one batch with the sweep's launcher (SLURM or local). Light to import: Hydra imports
every module of `hydra_plugins` when it starts."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


class SaelabResubmitSweeper(Sweeper):
    """Runs `saelab.app.resubmit.planned_jobs()`; a job that fails again fails the command, as in a sweep."""

    def __init__(self, **_: Any) -> None:
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from saelab.app.resubmit import planned_jobs

        jobs = planned_jobs()
        if not jobs:
            raise ValueError("hydra/sweeper=saelab_resubmit runs only under `saelab sweep-resubmit DIR`.")
        returns = self.launcher.launch(jobs, initial_job_idx=0)
        for ret in returns:
            _ = ret.return_value  # raises the job's error
        return [returns]


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="saelab_resubmit",
    node={"_target_": f"{__name__}.SaelabResubmitSweeper"},
    provider="saelab",
)
