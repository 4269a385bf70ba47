"""A throwaway single-node SLURM cluster for tests: its own munged (fresh key), slurmctld and slurmd, with every
config, key, socket, spool, state, log and pid file under one directory and free ports picked at start.

    with single_node_cluster(tmp_path) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)   # SLURM_CONF points the client commands here

On exit every job is cancelled and the daemons are stopped (SIGTERM, then SIGKILL); any process still carrying
this cluster's SLURM_CONF in its environment (a job, a slurmstepd) is killed too, and `leftover_processes()` must
then be empty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "srun")


def missing_binaries() -> list[str]:
    """The daemons and client commands (plus mungekey) not found on PATH or in /usr/sbin."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in (*DAEMONS, *CLIENTS, "mungekey") if shutil.which(name, path=search) is None]


def _binary(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free right now (bound together, so they differ, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


#: Lifetime of a job step's credential, and how long SLURM holds a requeued job before it may start again
#: (default 120 s): short, so that a test's requeued job runs again within seconds (the backfill scheduler, run
#: every second here instead of every 30 s, starts it once it may).
CRED_EXPIRE_S = 10


def _machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict[str, str]
    node: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """A SLURM client command against this cluster; its stdout."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def logs(self) -> str:
        """The daemons' log files, for failure messages."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*"))
        )

    def leftover_processes(self) -> list[int]:
        """Processes (other than this one) whose environment names this cluster's slurm.conf (the daemons,
        slurmstepd, the jobs) or whose command line names its directory (`pgrep -f`)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        if shutil.which("pgrep"):
            pgrep = subprocess.run(["pgrep", "-f", str(self.root)], capture_output=True, text=True)
            found = [int(pid) for pid in pgrep.stdout.split() if int(pid) != os.getpid()]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0") and int(proc.name) not in found:
                    found.append(int(proc.name))
            except OSError:
                continue
        return found


def _slurm_conf(root: Path, node: str, ports: list[int], munge_socket: Path) -> str:
    memory = min(4096, _machine_memory_mb() // 2)
    return f"""\
ClusterName=saelabtest
SlurmctldHost={node}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=300
SchedulerParameters=bf_interval=1
NodeName={node} CPUs=2 RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_for(predicate, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({proc.returncode}) while waiting for {what}\n{cluster.logs()}"
                )
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def _node_idle(cluster: Cluster) -> bool:
    done = subprocess.run(
        ["sinfo", "--noheader", "--nodes", cluster.node, "--format=%T"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return done.returncode == 0 and done.stdout.strip() == "idle"


def _stop(cluster: Cluster) -> None:
    """Cancel every job, wait for the queue to drain, stop the daemons, kill anything left of this cluster."""
    if "slurmctld" in cluster.processes and cluster.processes["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--user", "root", check=False, timeout=10)
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline
                and cluster.run("squeue", "--noheader", check=False, timeout=10).strip()
            ):
                time.sleep(0.5)
    for name in reversed([n for n in DAEMONS if n in cluster.processes]):
        proc = cluster.processes[name]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    for pid_file in (cluster.root / "run").glob("*.pid"):  # daemons that forked despite -D/-F
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    for pid in cluster.leftover_processes():  # jobs and slurmstepd of this cluster
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def single_node_cluster(root: Path, start_timeout: float = 60) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd under `root` (this host as controller and the one node, 2 CPUs,
    partition `debug`); yield once the node is idle; always stop everything on exit."""
    root = Path(root)
    for sub in ("munge", "state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    (root / "munge").chmod(0o755)  # munged refuses a socket directory that others cannot traverse
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, _free_ports(2), munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_ARRAY_JOB_ID"):  # never inherit an outer job's ids
        env.pop(name, None)
    cluster = Cluster(root=root, conf=conf, env=env, node=node)

    key = root / "munge" / "munge.key"
    subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    key.chmod(0o600)
    log = root / "log"
    commands = {
        "munged": [
            _binary("munged"), "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={log / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ],
        "slurmctld": [_binary("slurmctld"), "-D", "-i", "-f", str(conf)],
        "slurmd": [_binary("slurmd"), "-D", "-f", str(conf)],
    }  # fmt: skip
    try:
        for name, command in commands.items():
            out = (log / f"{name}.stdout").open("w")
            cluster.processes[name] = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            out.close()
            if name == "munged":
                _wait_for(munge_socket.exists, start_timeout, "munged's socket", cluster)
            if name == "slurmctld":
                _wait_for(lambda: _ping(cluster), start_timeout, "slurmctld", cluster)
        _wait_for(lambda: _node_idle(cluster), start_timeout, f"node {node} idle", cluster)
        yield cluster
    finally:
        _stop(cluster)


def _ping(cluster: Cluster) -> bool:
    done = subprocess.run(["scontrol", "ping"], env=cluster.env, capture_output=True, text=True, timeout=10)
    return done.returncode == 0 and "UP" in done.stdout
