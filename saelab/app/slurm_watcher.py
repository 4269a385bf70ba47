"""Job-state polling for submitit's SLURM jobs that also works on clusters without accounting.

submitit learns whether a submitted job has ended by polling `sacct` (every 2, 4, 8, ... s, at most every
10 min). Where accounting is off, sacct fails on every poll: submitit logs a warning each time and, since the
state stays unknown, waits forever for a job that ended without a result (cancelled, killed, timed out).
`QueueInfoWatcher` polls sacct while it works and switches to `squeue` (saelab.app.slurm_jobs) after its first
failure, saying so once. `install()` makes it the watcher of every submitit SlurmJob of this process.
"""

from __future__ import annotations

import logging
import subprocess
import time

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from saelab.app.slurm_jobs import ACTIVE, WAITING, queue_states

log = logging.getLogger(__name__)

#: The state given to a job that squeue no longer lists: it ended longer than MinJobAge ago.
NOT_LISTED = "NOT_LISTED"


class QueueInfoWatcher(SlurmInfoWatcher):
    """submitit's SLURM watcher with a fallback to squeue once sacct fails."""

    def __init__(self, delay_s: int = 600) -> None:
        super().__init__(delay_s)
        self.use_squeue = False

    def update(self) -> None:
        """Refresh the states of the registered jobs that have not ended (one sacct or squeue call)."""
        unfinished = self._registered - self._finished
        if not unfinished:
            return
        self._num_calls += 1
        if not self.use_squeue:
            try:
                listing = subprocess.run(self._make_command(), capture_output=True, text=True, check=True)
                self._info_dict.update(self.read_info(listing.stdout))
            except (OSError, subprocess.CalledProcessError) as error:
                reason = getattr(error, "stderr", "") or str(error)
                log.info("sacct failed (%s): polling SLURM job states with squeue instead", reason.strip())
                self.use_squeue = True
        if self.use_squeue:
            states = queue_states(unfinished)
            if states is not None:
                for job_id in unfinished:
                    self._info_dict[job_id] = {"JobID": job_id, "State": _submitit_state(states, job_id)}
        self._last_status_check = time.time()
        for job_id in unfinished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


def _submitit_state(states: dict[str, str], job_id: str) -> str:
    """The state submitit should see: its "RUNNING"/"PENDING" for every state of a job not yet ended (submitit
    takes any other state as ended), the final state otherwise."""
    state = states.get(job_id, NOT_LISTED)
    if state in ACTIVE:
        return "RUNNING"
    return "PENDING" if state in WAITING else state


def install() -> None:
    """Poll the SLURM jobs of this process with a QueueInfoWatcher (idempotent)."""
    if not isinstance(SlurmJob.watcher, QueueInfoWatcher):
        SlurmJob.watcher = QueueInfoWatcher(delay_s=SlurmJob.watcher._delay_s)
