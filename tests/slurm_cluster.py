"""A real single-node SLURM cluster on localhost, for the tests of the job files in launch/slurm/.

Debian's packages (slurmctld, slurmd, slurm-client, munge; `.ci/run` installs them) run as root with
munge authentication, one node (this machine, its CPUs and memory, at 127.0.0.1) advertising 8 GPUs
whose device files are plain placeholder files: a job that asks for GPUs is accepted, sees no CUDA
device and trains on CPU with gloo. Configuration, state, spool and logs live in a fresh directory
per test session; the daemons run in the foreground as children of the test process, and they and
every job are stopped when the session ends. What a session that died left running (daemons, job
steps, jobs: all name that directory, in their arguments or their SLURM_CONF) is killed at the next
start, once the pid in the directory's name is gone. munged is the machine's: reused if it runs,
else started, and left running.

`start()` raises `Unavailable` with the reason when the cluster cannot run here (not root, a package
missing, a daemon that does not come up): the caller decides whether that is a skip or a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ["slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "sinfo", "munged", "mungekey", "munge"]
DIR_PREFIX = "ddp-cifar-slurm-"  # + the pid of the test session that owns the directory
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
GPUS = 8


class Unavailable(RuntimeError):
    """The cluster cannot run on this machine; the message says why."""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """A process with this pid runs (a zombie does not: it may never be reaped in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def cluster_processes() -> list[tuple[int, Path]]:
    """(pid, cluster directory) of every process of a test cluster: the daemons (their -f argument),
    and slurmstepd and job processes (SLURM_CONF in their environment). Never this process or its parents."""
    found = []
    pattern = re.compile(r"(?:\w+=)?(/.*/" + re.escape(DIR_PREFIX) + r"\d+-[^/]+)(?:/.*)?")
    skip = _ancestors()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            items = ((proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()).split(b"\0")
        except OSError:
            continue
        match = next(filter(None, (pattern.fullmatch(i.decode(errors="replace")) for i in items)), None)
        if match:
            found.append((int(proc.name), Path(match.group(1))))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_stale_processes() -> list[int]:
    """Kill what is left of the clusters of test sessions that are gone (the session's pid is in the
    directory's name), and remove their directories; a second run on the same machine starts clean."""
    def gone(root: Path) -> bool:
        return not _pid_alive(int(root.name[len(DIR_PREFIX):].split("-")[0]))

    stale = [pid for pid, root in cluster_processes() if gone(root)]
    _kill(stale)
    for root in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*-*"):
        if re.fullmatch(re.escape(DIR_PREFIX) + r"\d+-\w+", root.name) and gone(root):
            shutil.rmtree(root, ignore_errors=True)
    return stale


def ensure_munge() -> None:
    """A working munged with the key at /etc/munge/munge.key: reuse a running one, else start it as munge."""
    if _munge_works():
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(MUNGE_KEY.parent, "munge", "munge")
        result = _run(["runuser", "-u", "munge", "--", "mungekey", "--create", "--keyfile", str(MUNGE_KEY)])
        if result.returncode:
            raise Unavailable(f"mungekey --create failed: {result.stderr.strip()}")
    MUNGE_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
    # --force: start even if a munged that died left its socket or pid file behind
    result = _run(["runuser", "-u", "munge", "--", "munged", "--force"])
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            log = Path("/var/log/munge/munged.log")
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise Unavailable(f"munged did not start: {result.stderr.strip()} {tail}")
        time.sleep(0.2)


def _munge_works() -> bool:
    encode = _run(["munge", "-n"])
    return encode.returncode == 0 and _run(["unmunge"], input=encode.stdout).returncode == 0


@dataclass
class Cluster:
    root: Path  # config, state, spool and logs
    node: str  # the one node's name: this machine's host name
    env: dict[str, str]  # the environment for client commands (SLURM_CONF)
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        result = _run(list(cmd), env=self.env, cwd=cwd)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit a job (`sbatch --parsable ARGS` run in cwd, with these variables exported too); its id."""
        exports = ",".join(["ALL", *(f"{k}={v}" for k, v in (env or {}).items())])
        result = self.run("sbatch", "--parsable", f"--export={exports}", *args, cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, BatchHost, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
                                                                          "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                                                          "BOOT_FAIL", "DEADLINE", "PREEMPTED")
             ) -> dict[str, str]:
        """Poll until the job reaches one of these states (default: any final state); the job's record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after "
                                   f"{timeout:.0f} s")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, kill whatever of the cluster is left, remove its directory."""
        jobs = self.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 15
            while self.run("squeue", "--noheader", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in self.daemons:
            if daemon.poll() is None:
                daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        _kill([pid for pid, root in cluster_processes() if root == self.root])
        shutil.rmtree(self.root, ignore_errors=True)


def node_hardware() -> str:
    """This machine's `slurmd -C` node description without the name (CPUs=.. Boards=.. RealMemory=..)."""
    result = _run(["slurmd", "-C"])
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("NodeName=")), None)
    if result.returncode or line is None:
        raise Unavailable(f"slurmd -C failed: {result.stdout}{result.stderr}")
    return " ".join(word for word in line.split() if not word.startswith("NodeName="))


def write_config(root: Path, node: str, ctld_port: int, slurmd_port: int) -> None:
    gpus = [root / "gpu" / f"placeholder{i}" for i in range(GPUS)]
    gpus[0].parent.mkdir()
    for gpu in gpus:
        gpu.touch()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    (root / "slurm.conf").write_text(f"""\
ClusterName=ddptest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EnforcePartLimits=ALL
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 {node_hardware()} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File={gpus[0].parent}/placeholder[0-{GPUS - 1}]\n")


def start(timeout: float = 30) -> Cluster:
    """Start slurmctld and slurmd on this machine; raise Unavailable with the reason if they cannot run."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        raise Unavailable(f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client "
                          "munge; .ci/run does)")
    if os.geteuid() != 0:
        raise Unavailable("the test cluster's daemons run as root; this is not root")
    kill_stale_processes()
    ensure_munge()
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)
    except OSError as e:
        raise Unavailable(f"this host's name {node!r} does not resolve ({e}); jobs need it as the node name") from e
    root = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
    root.chmod(0o755)
    write_config(root, node, _free_port(), _free_port())
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    cluster = Cluster(root, node, env)
    try:
        for cmd in (["slurmctld", "-D", "-i", "-f", str(cluster.conf)],
                    ["slurmd", "-D", "-N", node, "-f", str(cluster.conf)]):
            with open(root / f"{cmd[0]}.stdout.log", "w") as log:  # the daemon keeps its own copy
                cluster.daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL, start_new_session=True))
        return wait_until_idle(cluster, nodes=1, timeout=timeout)
    except BaseException:
        cluster.stop()
        raise


def wait_until_idle(cluster: Cluster, nodes: int, timeout: float) -> Cluster:
    """`cluster` once sinfo shows all its `nodes` idle; Unavailable (with the daemons' logs) if a daemon
    exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        state = cluster.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
        if state.returncode == 0 and state.stdout.split() == ["idle"] * nodes:
            return cluster
        dead = [str(d.args[0]) for d in cluster.daemons if d.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise Unavailable(f"the SLURM daemons did not come up ({'exited: ' + ', '.join(dead) if dead else ''}"
                              f" node states {state.stdout.strip() or state.stderr.strip()!r}):\n{cluster.logs()}")
        time.sleep(0.2)
