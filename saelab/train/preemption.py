"""Preemption safety: checkpoints on a clock, and a clean stop at a step boundary on a signal.

Signals that ask a run to stop: SIGINT (Ctrl-C), SIGTERM (`kill`, `scancel`, a scheduler's preemption) and SIGUSR2
(submitit's warning `signal_delay_s` before a SLURM job's time limit). While `catch_stop_signals()` is active
(`Trainer.fit` enters it; an application may enter it around more work, e.g. fit plus its summary), these signals
only record themselves; a training loop reads `stop_requested()` between steps (a Python attribute: no device
sync), writes a checkpoint and raises `TrainingStopped`. A second Ctrl-C interrupts at once.

When the outermost block ends, the handlers from before are restored and the caught signals are handed on to
them: Python handlers someone else installed (submitit's, which requeues the SLURM job on SIGUSR2; a sweep's
SIGTERM handler) are called; with the default handlers the `TrainingStopped` exception is what remains. A signal
caught after the last step (while the final SAE is saved) is delivered once the block ends, as if it had come
then, except SIGUSR2: a finished run has nothing left to save before a time limit.

`CheckpointClock` says when `trainer.checkpoint_every_minutes` of training have passed since the last
checkpoint, so a job killed without warning (SIGKILL, a node failure) loses at most that much.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class TrainingStopped(KeyboardInterrupt):
    """A run stopped at a step boundary on a signal, after writing `checkpoint` (None: nothing to write to).

    A KeyboardInterrupt, so that `except Exception` blocks (Hydra's job runner, submitit's result writer) let it
    pass, as they would a Ctrl-C."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_dir: Path | None):
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no output directory, nothing saved"
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name} ({saved})")


class _Catcher:
    """The signals caught while `catch_stop_signals` is active, and the handlers it replaced."""

    def __init__(self) -> None:
        self.depth = 0
        self.caught: list[int] = []
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: object) -> None:
        # record only: printing here could re-enter a write the main thread is in the middle of
        if signum not in self.caught:
            self.caught.append(signum)
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self.previous.get(signal.SIGINT) or signal.SIG_DFL)


_catcher = _Catcher()


def stop_requested() -> int | None:
    """The first stop signal caught since the outermost `catch_stop_signals` began (None: keep training)."""
    return _catcher.caught[0] if _catcher.caught else None


def _is_python_handler(handler: object) -> bool:
    """A handler someone installed (not SIG_DFL / SIG_IGN / Python's own KeyboardInterrupt raiser)."""
    return callable(handler) and handler is not signal.default_int_handler


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[None]:
    """Record SIGINT / SIGTERM / SIGUSR2 inside the block instead of acting on them (see the module docstring).
    Re-entrant; outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _catcher.depth == 0:
        _catcher.caught = []
        _catcher.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, _catcher.handle)
    _catcher.depth += 1
    try:
        yield
    except TrainingStopped:
        if _catcher.depth == 1:
            _hand_on(deliver_defaults=False)
        raise
    else:
        if _catcher.depth == 1:
            _hand_on(deliver_defaults=True)
    finally:
        _catcher.depth -= 1
        if _catcher.depth == 0:
            _restore()


def _restore() -> None:
    for sig, handler in _catcher.previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _hand_on(deliver_defaults: bool) -> None:
    """Restore the previous handlers and give them the caught signals, in the order they came. After a stop
    (TrainingStopped) only Python handlers are called; after a completed run a default handler's signal is
    raised again (SIGUSR2 is dropped)."""
    caught, previous = list(_catcher.caught), dict(_catcher.previous)
    _catcher.caught = []
    _restore()
    for signum in caught:
        handler = previous.get(signum)
        if _is_python_handler(handler):
            if deliver_defaults and signum == signal.SIGUSR2:
                continue
            handler(signum, None)
        elif deliver_defaults and signum != signal.SIGUSR2 and handler != signal.SIG_IGN:
            signal.raise_signal(signum)


class CheckpointClock:
    """Whether `minutes` of wall-clock time have passed since the clock was (re)started; minutes 0: never."""

    def __init__(self, minutes: float, now: Callable[[], float] | None = None):
        self.interval_s, self.now = minutes * 60.0, now or time.monotonic
        self.started = self.now()

    def due(self) -> bool:
        return self.interval_s > 0 and self.now() - self.started >= self.interval_s

    def restart(self) -> None:
        self.started = self.now()
