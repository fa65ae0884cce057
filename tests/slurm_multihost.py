"""A real SLURM cluster of several hosts: slurmctld and a slurmd on host1, a slurmd on each other host,
the hosts being network namespaces (tests/netns_hosts.py). Pieces as in tests/slurm_cluster.py (Debian's
packages, root, munge: the machine's munged, whose socket every namespace sees on the shared file system),
but every daemon and client command runs on a host, and the node names are the hosts' names at their
addresses. Stopping the hosts (`Hosts.close()`) kills whatever of the cluster is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import netns_hosts
import slurm_cluster
from slurm_cluster import DIR_PREFIX, PROGRAMS, Cluster, Unavailable


class MultiHostCluster(Cluster):
    """A Cluster whose client commands run on host1 (where slurmctld listens)."""

    hosts: netns_hosts.Hosts

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        result = self.hosts.run(1, ["env", f"SLURM_CONF={self.conf}", *cmd], cwd=cwd, timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result


def write_config(root: Path, hosts: netns_hosts.Hosts) -> None:
    (root / "state").mkdir()
    for h in range(1, hosts.count + 1):
        (root / f"spool-{hosts.name(h)}").mkdir()
    hardware = slurm_cluster.node_hardware()
    nodes = "".join(f"NodeName={hosts.name(h)} NodeAddr={hosts.addr(h)} {hardware} State=UNKNOWN\n"
                    for h in range(1, hosts.count + 1))
    (root / "slurm.conf").write_text(f"""\
ClusterName=ddptestmulti
SlurmctldHost={hosts.name(1)}({hosts.addr(1)})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
KillWait=10
MinJobAge=600
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")


def start(hosts: netns_hosts.Hosts, timeout: float = 45) -> MultiHostCluster:
    """slurmctld on host1, a slurmd per host; raise Unavailable with the reason if they cannot run."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        raise Unavailable(f"not installed: {', '.join(missing)} (.ci/run installs them)")
    slurm_cluster.kill_stale_processes()
    slurm_cluster.ensure_munge()
    root = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
    root.chmod(0o755)
    write_config(root, hosts)
    cluster = MultiHostCluster(root, hosts.name(1), {**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
    cluster.hosts = hosts
    try:
        daemons = [(1, ["slurmctld", "-D", "-i"])] + [(h, ["slurmd", "-D", "-N", hosts.name(h)])
                                                      for h in range(1, hosts.count + 1)]
        for host, cmd in daemons:
            with open(root / f"{cmd[0]}-{host}.stdout.log", "w") as log:
                cluster.daemons.append(hosts.popen(host, [*cmd, "-f", str(cluster.conf)], env=cluster.env, stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True))
        return slurm_cluster.wait_until_idle(cluster, nodes=hosts.count, timeout=timeout)
    except BaseException:
        cluster.stop()
        raise
