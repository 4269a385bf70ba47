"""What a sweep's SLURM jobs are doing: their states from `squeue`, and submitit's record of each job.

`queue_states(ids)` asks squeue, which answers whether or not the cluster keeps accounting (sacct needs it):
each listed job's state, one entry per array task ("123_4"), or None where squeue is absent or fails. The
controller lists a job while it is pending or running and for `MinJobAge` seconds (300 by default) after it
ends; a job missing from a successful listing has ended.

`submitted_jobs(sweep_dir)` lists the jobs hydra-submitit-launcher submitted for a sweep, from the folder it
keeps per job: the pickled call (the job's number and overrides, known before the job starts) and, once the
job returned or raised, its result.
"""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: The folder of a sweep where hydra-submitit-launcher keeps one folder per job (`<sweep>/.submitit/<job id>/`).
SUBMITIT = ".submitit"

#: squeue states of jobs that have not ended, by what they mean for a sweep.
WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
ACTIVE = frozenset(
    {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED"}
)


def queue_states(job_ids: Iterable[str], timeout_s: float = 30) -> dict[str, str] | None:
    """{job id: squeue state} for the listed jobs (array tasks one by one, e.g. "123_4": "RUNNING"), for the
    given job ids or array ids ("123" lists every task of array 123). None where squeue is unavailable."""
    ids = sorted({str(i).split("_")[0] for i in job_ids})
    if not ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(ids)}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        # squeue refuses a listing whose ids have all left the controller: none of them is queued any more.
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id and state:
            states[job_id] = state.split()[0]
    return states


@dataclass(frozen=True)
class SubmittedJob:
    """One job submitit submitted for a sweep: `folder` = <sweep>/.submitit/<job_id>/ holds the pickled call
    (the job's Hydra overrides and number) and, once the job returns or raises, its result pickle."""

    job_id: str
    folder: Path

    def submission(self) -> tuple[int | None, list[str]]:
        """The job's number in the sweep (its run folder's prefix) and its Hydra overrides, from the pickled
        launcher call (overrides, job dir key, number, Hydra job id, Hydra state); (None, []) if unreadable."""
        try:
            with (self.folder / f"{self.job_id}_submitted.pkl").open("rb") as f:
                overrides, _, num, *_ = pickle.load(f).args
        except (
            OSError,
            pickle.UnpicklingError,
            AttributeError,
            ImportError,
            EOFError,
            ValueError,
            TypeError,
        ):
            return None, []
        return int(num), [str(o) for o in overrides]

    def outcome(self) -> tuple[str, str | None] | None:
        """("success", None) or ("error", the exception's last line) from the job's result pickle (task 0);
        None while the job has not returned (pending, running, or killed before it could write one)."""
        path = self.folder / f"{self.job_id}_0_result.pkl"
        try:
            with path.open("rb") as f:
                outcome, value = pickle.load(f)
        except FileNotFoundError:
            return None
        except (OSError, pickle.UnpicklingError, AttributeError, ImportError, EOFError, ValueError):
            return ("error", f"unreadable result file {path}")
        if outcome == "success":
            return ("success", None)
        lines = [line for line in str(value).strip().splitlines() if line.strip()]
        return ("error", lines[-1] if lines else str(outcome))


def submitted_jobs(sweep_dir: Path) -> list[SubmittedJob]:
    """The jobs submitit submitted for the sweep (none for a local sweep), in job id order."""
    folder = Path(sweep_dir) / SUBMITIT
    if not folder.is_dir():
        return []
    jobs = [  # a job array's own folder (no pickle) is left out: its tasks have theirs
        SubmittedJob(p.name, p)
        for p in folder.iterdir()
        if re.fullmatch(r"\d+(_\d+)?", p.name) and (p / f"{p.name}_submitted.pkl").is_file()
    ]
    return sorted(jobs, key=lambda job: tuple(int(part) for part in job.job_id.split("_")))
