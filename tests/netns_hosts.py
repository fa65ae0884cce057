"""Hosts of our own for the multi-host tests: Linux network namespaces on one machine.

    with netns_hosts.Hosts(2) as hosts:        # host1 = 10.99.0.1, host2 = 10.99.0.2
        job = hosts.popen(1, ["hostname"], stdout=subprocess.PIPE)

Each host is a network namespace with its own loopback and one veth interface (eth0) whose other
end sits on a bridge inside a namespace of its own, so the hosts reach each other and nothing else:
no route leaves these namespaces, and nothing is connected to the machine's own network. Every
command on a host runs in a UTS namespace with the host's name (hostN) and sees an /etc/hosts like
Debian's: its own name at 127.0.1.1, the other hosts at their addresses (/etc/netns/NS/hosts, bind-mounted
over /etc/hosts as `ip netns exec` would). The file system is shared, as NFS would be on a cluster.

`Hosts(...)` raises `Unavailable` with the reason where namespaces cannot be made (not root, no `ip`,
EPERM); leaving the `with` block kills every process in the namespaces and deletes them, as does
`remove_stale()` for what a test session that died left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Self

SUBNET = "10.99.0"  # a private range of our own; it exists only inside these namespaces
PREFIX = "ddpc"  # namespace names: ddpc<owner pid>-br, ddpc<owner pid>-h1, ...
NETNS_ETC = Path("/etc/netns")


class Unavailable(RuntimeError):
    """Network namespaces are not permitted here (not root, EPERM); the message says why."""


class NotInstalled(Unavailable):
    """A program the hosts need is missing: .ci/run installs it."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _kill_all_in(ns: str) -> None:
    """SIGKILL every process in network namespace `ns`, until none is left (children may be forking)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _delete(ns: str) -> None:
    _kill_all_in(ns)
    _ip("netns", "delete", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_stale() -> None:
    """Delete the namespaces of test sessions whose process is gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        owner = ns.removeprefix(PREFIX).split("-")[0]
        if ns.startswith(PREFIX) and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _delete(ns)


class Hosts:
    """`count` hosts, host1..hostN at SUBNET.1..N, on one bridge."""

    def __init__(self, count: int = 2) -> None:
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NotInstalled("`ip` is not installed (apt-get install iproute2; .ci/run does)")
        if shutil.which("nsenter") is None or shutil.which("unshare") is None:
            raise NotInstalled("`nsenter` or `unshare` is missing (apt-get install util-linux)")
        self.count = count
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.created: list[str] = []
        remove_stale()
        try:
            self._build()
        except RuntimeError as e:
            self.close()
            raise Unavailable(f"cannot make network namespaces here: {e}") from None

    def ns(self, host: int) -> str:
        return f"{self.tag}-h{host}"

    @staticmethod
    def name(host: int) -> str:
        return f"host{host}"

    @staticmethod
    def addr(host: int) -> str:
        return f"{SUBNET}.{host}"

    def _add_ns(self, ns: str) -> None:
        _delete(ns)  # a leftover of the same name (our pid was reused)
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for h in range(1, self.count + 1):
            ns = self.ns(h)
            self._add_ns(ns)
            _ip("-n", self.bridge_ns, "link", "add", f"veth{h}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", f"veth{h}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(h)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            peers = "".join(f"{self.addr(p)}\t{self.name(p)}\n" for p in range(1, self.count + 1) if p != h)
            (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name(h)}\n{peers}")

    def command(self, host: int, cmd: list[str]) -> list[str]:
        """`cmd` as run on `host`: in its network namespace, under its hostname, with its /etc/hosts.

        (Not `ip netns exec`, which also mounts a sysfs of its own over /sys, hiding the machine's
        /sys/fs/cgroup from slurmd: a mount namespace of our own with the one bind mount instead.)
        """
        hosts_file = NETNS_ETC / self.ns(host) / "hosts"
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}", "unshare", "--uts", "--mount", "--", "sh", "-c",
                'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"', self.name(host),
                str(hosts_file), *cmd]

    def popen(self, host: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, cmd), **kwargs)

    def run(self, host: int, cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd), check=False, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def pids(self, host: int) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.ns(host), check=False).stdout.split()]

    def kill_all(self, host: int) -> None:
        """SIGKILL every process on `host`, as a node that loses power."""
        _kill_all_in(self.ns(host))

    def link(self, host: int, up: bool) -> None:
        """Cut (or restore) `host`'s cable: its bridge port goes down, its processes live on."""
        _ip("-n", self.bridge_ns, "link", "set", f"veth{host}", "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.created):
            _delete(ns)
        self.created.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
