"""Several hosts for real: launch/torchrun_multinode.sh on hosts made of network namespaces (tests/netns_hosts.py),
each with its own address, hostname and Debian-like /etc/hosts (its own name at 127.0.1.1).

Skipped with the reason where namespaces cannot be made (not root, no `ip`); with CI=true they fail instead.
Nothing here talks to an address outside the namespaces.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import netns_hosts
from conftest import REPO
from test_launch import TRAIN, unavailable

SCRIPT = str(REPO / "launch" / "torchrun_multinode.sh")


@pytest.fixture
def hosts():
    try:
        made = netns_hosts.Hosts(2)
    except netns_hosts.Unavailable as e:
        unavailable(f"no test hosts: {e}")
    with made:
        yield made


class Agent:
    """launch/torchrun_multinode.sh running on one host, its output in files under the test's directory."""

    def __init__(self, hosts: netns_hosts.Hosts, host: int, cwd: Path, env: dict[str, str], args: list[str],
                 tag: str = "") -> None:
        self.out, self.err = cwd / f"out{host}{tag}.txt", cwd / f"err{host}{tag}.txt"
        assignments = [f"{k}={v}" for k, v in env.items()]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = hosts.popen(host, ["env", "-i", *assignments, SCRIPT, *args], cwd=cwd, stdout=out, stderr=err)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.logs()}") from None

    def logs(self) -> str:
        return f"--- {self.out.name}\n{self.out.read_text()}--- {self.err.name}\n{self.err.read_text()[-4000:]}"


def agent_env(**extra: str) -> dict[str, str]:
    """A user's environment on a node: PATH, the interpreter and the job's settings, nothing else of this machine's."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHON": sys.executable,
            "NNODES": "2", "NPROC": "1", "MASTER_ADDR": netns_hosts.Hosts.addr(1), "MASTER_PORT": "29500",
            "OMP_NUM_THREADS": "1", **extra}


def wait_for(path: Path, pattern: str, timeout: float, agents: list[Agent]) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text())
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {path.name} after {timeout} s:\n" + "\n".join(a.logs() for a in agents))


def test_two_hosts_train_as_one_world_with_the_rendezvous_on_host1(hosts, tmp_path):
    """The three traps (who hosts the store, the address the workers meet at, gloo's interface) handled by
    the script on each host: one world of 2, one writer, trained; each host says what it worked out."""
    env = agent_env()
    agents = [Agent(hosts, h, tmp_path, env, [*TRAIN, "--epochs", "1", "--timeout-min", "1"]) for h in (1, 2)]
    codes = [agent.wait(timeout=120) for agent in agents]
    logs = "\n".join(agent.logs() for agent in agents)
    assert codes == [0, 0], logs
    assert "host1 hosts the rendezvous, at 10.99.0.1, gloo on eth0" in agents[0].err.read_text(), logs
    assert "host2 joins the rendezvous, at 10.99.0.2, gloo on eth0" in agents[1].err.read_text(), logs
    outs = [agent.out.read_text() for agent in agents]
    assert sum(o.count("world 2 x cpu (gloo)") for o in outs) == 1, logs  # one world, logged by its rank 0
    assert sum(o.count("epoch 1/1") for o in outs) == 1, logs
    assert len(list((tmp_path / "runs").rglob("events.out.tfevents.*"))) == 1, logs  # one TensorBoard writer
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["env"]["world_size"] == 2


@pytest.mark.parametrize("master, expected", [
    ("host1", ("error: MASTER_ADDR=host1 resolves to 127.0.1.1, a loopback address, on host1 (see /etc/hosts), which "
              "the other nodes cannot reach: set MASTER_ADDR to this node's network address (10.99.0.1)")),
    ("10.98.0.1", "error: no route from host1 to MASTER_ADDR=10.98.0.1 (10.98.0.1): "),  # no such network here
    ("nosuchhost", ("error: MASTER_ADDR=nosuchhost does not resolve on host1: set MASTER_ADDR to the rendezvous "
                   "node's IP address")),
])
def test_what_the_script_cannot_work_out_fails_at_start_with_one_line(hosts, tmp_path, master, expected):
    started = time.monotonic()
    result = hosts.run(1, ["env", "-i", *[f"{k}={v}" for k, v in agent_env(MASTER_ADDR=master).items()], SCRIPT],
                       cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 10
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
