"""Hydra finds launchers only in the `hydra_plugins` namespace: this shim is `hydra/launcher=together`'s target and
hands everything to `saelab.app.together.TogetherLauncher`, imported on first use (Hydra imports every plugin module
when it starts, so this one imports nothing heavy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class TogetherLauncher(Launcher):
    """Every job of a sweep trained in one process on one activation stream (docs/together.md)."""

    def __init__(self, **params: Any) -> None:
        from saelab.app.together import TogetherLaunch

        self.launch_impl = TogetherLaunch(**params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.launch_impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return self.launch_impl.launch(job_overrides, initial_job_idx)
