"""The process group: who am I, which device, and the few collectives the trainer needs.

This is the only module that initialises torch.distributed. Under torchrun the usual environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...) describe the job; without them this is a
job of one process, which still gets a (single-member) process group so that the trainer has one
code path for every topology.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp.checkpoint.errors import printable


@dataclass(frozen=True)
class Context:
    rank: int  # global rank: 0 is the one that prints, logs and writes checkpoints
    local_rank: int  # rank on this node: picks the GPU
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(flag: str, local_rank: int, local_world_size: int) -> torch.device:
    """cuda:LOCAL_RANK when asked for (or, with auto, when every local rank has a GPU), else cpu."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if flag == "cuda" and gpus < local_world_size:
        raise RuntimeError(f"--device cuda needs a GPU per process: {local_world_size} processes on "
                           f"this node, {gpus} GPUs; start fewer processes or use --device cpu")
    if flag == "cuda" or (flag == "auto" and gpus >= local_world_size):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where the hardware computes bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX).

    Elsewhere bf16 is emulated and an order of magnitude slower than float32 (AVX2-only CPUs such as Zen 3).
    `ATEN_CPU_CAPABILITY=avx2` holds torch's CPU kernels to AVX2, and then bf16 counts as emulated too.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    avx512_kernels = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return avx512_kernels and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_backend(flag: str, device: torch.device) -> str:
    if flag == "nccl" and device.type != "cuda":
        raise RuntimeError("--backend nccl needs CUDA devices; use --backend gloo on CPU")
    if flag == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return flag


def rendezvous_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The key-value store the ranks meet in: torchrun's (env://), or an in-memory one for a lone process.

    Where torchrun's agent hosts it, the store outlives a restart of the workers and still holds
    the previous attempt's keys, among them the old address of each rank's gloo/NCCL listener; a
    new rank that read one of those before its peer overwrote it would connect to a dead port and
    hang. A prefix per restart attempt keeps each attempt's keys apart. Where rank 0 hosts it
    (launch/torchrun_multinode.sh sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), every attempt has a
    new store, and no prefix: the restart counts of the agents differ once a node has (re)joined.
    """
    if "MASTER_ADDR" not in os.environ:
        return dist.HashStore()
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 serves it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timeout, multi_tenant=True)
    if not agent_hosts_it:
        return store
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


@contextlib.contextmanager
def process_group(device: str = "auto", backend: str = "auto", timeout_min: float = 10.0) -> Iterator[Context]:
    """Initialise the process group for this job, and always tear it down (success, error, Ctrl-C)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    dev = resolve_device(device, local_rank, local_world_size)
    backend = resolve_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init, so NCCL binds this rank to its own GPU
    timeout = timedelta(minutes=timeout_min)
    dist.init_process_group(backend, store=rendezvous_store(rank, world_size, timeout), rank=rank,
                            world_size=world_size, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    try:
        yield Context(rank, local_rank, world_size, dev, backend)
    finally:
        # DDP modules sit in reference cycles, so they (and the gloo/NCCL work they hold) would be
        # freed only as Python shuts down, where a C++ thread torn down late aborts the process
        # ("terminate called without an active exception"). Free them now, then the group.
        gc.collect()
        dist.destroy_process_group()


LOST_PEER = re.compile(r"Connection (reset|closed) by peer|Broken pipe|Timed out waiting|timed out|wait timeout")


def lost_peer(error: BaseException) -> str | None:
    """The first line of a collective's error that says another rank vanished (its node died, its link is
    down), else None: an event of a multi-node job that torchrun restarts from, not a bug to trace."""
    if not isinstance(error, (dist.DistError, RuntimeError)):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not LOST_PEER.search(first) or not ("gloo" in first or "NCCL" in first or isinstance(error, dist.DistError)):
        return None
    first = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\] ", "", first)  # gloo's source location
    return first.split(". This is typically")[0]  # gloo's generic advice


class LostPeerError(RuntimeError):
    """A collective failed because another rank vanished; the message says where training was."""


class PeerFailedError(RuntimeError):
    """Another rank failed at a point where all ranks agree on success; its own error says why."""


def log(message: str, *, every_rank: bool = False) -> None:
    """Print on global rank 0; with every_rank, other ranks print too, prefixed with their rank.

    Control characters are escaped: messages quote names read from checkpoints, which may hold escape sequences.
    """
    message = "\n".join(printable(line) for line in str(message).split("\n"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    try:
        if rank == 0:
            print(message, flush=True)
        elif every_rank:
            print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)
    except BrokenPipeError:  # the reader died (a killed launcher's `| tee`): train and save on, unheard
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())  # (Python's own advice: the buffered bytes go nowhere)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP broadcasts buffers at the start of each training forward, but each rank then updates its own
    copy with its own batch: without this, ranks would evaluate slightly different models, and not the
    one rank 0 saves.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value`, on every rank (one collective)."""
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank: how ranks agree to fail together."""
    return bool(max_over_ranks(int(flag), device))


def run_and_agree(work: Callable[[], None], *, here: bool, device: torch.device) -> None:
    """Run `work` on the ranks where `here` is true, then agree on the outcome with one collective.

    Acts as a barrier, except that a failure on the working rank ends every rank with an error
    at once, instead of leaving the others waiting in a barrier until the timeout.
    """
    error = None
    if here:
        try:
            work()
        except Exception as e:  # noqa: BLE001 -- re-raised below, once the other ranks know
            error = e
    if any_rank(error is not None, device):
        if error is not None:
            raise error
        raise PeerFailedError("another rank failed (its error is in the log); stopping too")


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM and torchrun send before a kill) only set a flag here.

    Saving inside a signal handler could interrupt the training step or a collective; instead the
    loop calls `agree()` at step boundaries, where all ranks learn whether any rank was signalled.
    The handlers stay for the life of the process, so that a second signal during the final save or
    the teardown cannot kill a rank halfway; `ignore()` keeps it so while Python shuts down.

    A worker of torchrun whose agent died (kill -9, an OOM kill of the agent's process group) is an
    orphan: torchrun starts it in a session of its own, so nothing else would ever stop it, and its
    rank 0 would keep the checkpoint directory locked. `agree()` counts that as a stop request too:
    the parent's pid no longer being the one at start is one cheap system call per check.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    ORPHANED = 1000  # above every signal number: agree() reports it as LAUNCHER_GONE
    LAUNCHER_GONE = "torchrun is gone"

    def __init__(self) -> None:
        self.received = 0
        # Only under torchrun: a lone `nohup python -m ddp.train &` may outlive its shell on purpose.
        self.parent = os.getppid() if "TORCHELASTIC_RESTART_COUNT" in os.environ else None
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    @classmethod
    def ignore(cls) -> None:
        """Ignore further stop signals: Python resets its own handlers to "die" when it shuts down,
        and torchrun signals the ranks that are still exiting as soon as the first one has."""
        for s in cls.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def orphaned(self) -> bool:
        """This worker's launcher died: its parent is no longer the torchrun agent that started it."""
        return self.parent is not None and os.getppid() != self.parent

    def agree(self, device: torch.device) -> str | None:
        """On every rank: why to stop (the name of a signal any rank received, or LAUNCHER_GONE where
        any rank's torchrun died), or None (one collective)."""
        reason = max_over_ranks(self.ORPHANED if self.orphaned() else self.received, device)
        if reason == self.ORPHANED:
            return self.LAUNCHER_GONE
        return signal.Signals(reason).name if reason else None
