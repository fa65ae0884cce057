"""DCP directories: read whole what 2 ranks wrote sharded, write what DCP loads on 2 ranks, refuse payloads.

This file is also the script the 2-rank tests run under torchrun: `test_dcp.py save OUT` / `load DIR`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import run_module
from ddp.checkpoint import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointWriteError,
    UntrustedPickleError,
    is_dcp_directory,
    read_dcp,
    write_dcp,
)
from ddp.models import build

LOAD_MARKER = "DCP_LOAD_OK"


def fastnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("fastnet_small", 10)


def resnet(seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def extra_tensors() -> dict[str, torch.Tensor]:
    """Uneven shards (5 rows over 2 ranks) and a split along dim 1: offsets that are not all on dim 0."""
    return {"odd": torch.arange(5.0), "cols": torch.arange(28, dtype=torch.int32).reshape(4, 7)}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- run under torchrun: the workers --------------------------------------------------------------------------

def _sharded_save(out: Path) -> None:
    """FSDP2 fastnet and DTensor-sharded resnet18 + odd shapes, each saved by both ranks with dcp.save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    model = fastnet(0)
    fully_shard(model, mesh=mesh)
    dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=out / "fastnet")

    def shard(t: torch.Tensor, dim: int = 0) -> torch.Tensor:  # 0-dim buffers (num_batches_tracked) replicate
        return distribute_tensor(t, mesh, [Shard(dim)] if t.dim() else [Replicate()], src_data_rank=None)

    state = {k: shard(v) for k, v in resnet(0).state_dict().items()}
    extra = extra_tensors()
    extra = {"odd": shard(extra["odd"]), "cols": shard(extra["cols"], 1)}
    dcp.save({"model": state, "extra": extra, "step": 7}, checkpoint_id=out / "resnet")


def _load(directory: Path) -> None:
    """dcp.load our weights into a fresh plain model and into a fresh FSDP2-sharded one, on each rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    want = fastnet(0).state_dict()
    plain = fastnet(1 + dist.get_rank())
    assert not torch.equal(plain.state_dict()["head.weight"], want["head.weight"])
    dcp.load({"model": plain.state_dict()}, checkpoint_id=directory)
    assert_same(plain.state_dict(), want)

    sharded = fastnet(3)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (2,)))
    dcp.load({"model": sharded.state_dict()}, checkpoint_id=directory)
    got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.state_dict().items()}
    assert_same(got, want)
    print(f"{LOAD_MARKER} rank {dist.get_rank()}", flush=True)


def _worker(mode: str, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        {"save": _sharded_save, "load": _load}[mode](Path(path))
        # Both ranks past their last collective before either tears down: a rank that destroys its gloo
        # pairs while the other still drains one has ended in "terminate called" (SIGABRT) under CI.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def torchrun(mode: str, path: Path) -> None:
    t0 = time.monotonic()
    proc = run_module(["torchrun", "--standalone", "--nproc_per_node=2", str(Path(__file__)), mode, str(path)],
                      cwd=path.parent, timeout=120)
    print(f"torchrun {mode}: {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if mode == "load":
        assert proc.stdout.count(LOAD_MARKER) == 2, proc.stdout


# --- the tests ------------------------------------------------------------------------------------------------

def test_read_what_two_ranks_wrote_sharded(tmp_path: Path) -> None:
    torchrun("save", tmp_path)
    for name, want in [("fastnet", fastnet(0).state_dict()), ("resnet", resnet(0).state_dict())]:
        directory = tmp_path / name
        assert is_dcp_directory(directory)
        sizes = [p.stat().st_size for p in sorted(directory.glob("*.distcp"))]
        assert len(sizes) == 2 and min(sizes) > 0.4 * sum(sizes), sizes  # each rank wrote its half
        state, names = read_dcp(directory)
        assert names == [] and state["step"] == 7
        assert_same(state["model"], want)
    assert_same(state["extra"], extra_tensors())


def test_dcp_loads_what_write_dcp_wrote_on_two_ranks(tmp_path: Path) -> None:
    model = fastnet(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    sgd.step()
    model.load_state_dict(fastnet(0).state_dict())  # the weights the workers rebuild from seed 0
    progress = {"epoch": 3, "step": 120, "batch_in_epoch": 0}
    directory = tmp_path / "ckpt"
    write_dcp({"model": model.state_dict(), "optimizer": sgd.state_dict(), "progress": progress}, directory)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the temp sibling was renamed, nothing left over

    state, names = read_dcp(directory)
    assert names == [] and state["progress"] == progress
    assert_same(state["model"], model.state_dict())
    assert state["optimizer"]["param_groups"] == sgd.state_dict()["param_groups"]
    # DCP str()s every dict key; read_dcp gives the optimizer state back its int parameter indices
    momentum = {i: s["momentum_buffer"] for i, s in sgd.state_dict()["state"].items()}
    assert_same({i: s["momentum_buffer"] for i, s in state["optimizer"]["state"].items()}, momentum)
    fresh = torch.optim.SGD(fastnet(0).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(state["optimizer"])  # keyed "0", "1", ..., every buffer would be silently dropped
    params = fresh.param_groups[0]["params"]
    assert momentum and all(torch.equal(fresh.state[params[i]]["momentum_buffer"], m) for i, m in momentum.items())

    torchrun("load", directory)


def test_write_dcp_refuses_a_filled_destination_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    filled = tmp_path / "filled"
    filled.mkdir()
    (filled / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointWriteError, match="not an empty directory"):
        write_dcp({"x": torch.ones(2)}, filled)
    assert [p.name for p in filled.iterdir()] == ["keep.txt"]

    with pytest.raises(CheckpointWriteError, match="could not write DCP checkpoint") as err:
        write_dcp({"x": torch.ones(2), "bad": lambda: 0}, tmp_path / "new")  # a lambda does not pickle
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filled"]

    (tmp_path / "empty").mkdir()
    write_dcp({"x": torch.ones(2)}, tmp_path / "empty")  # an empty directory is fine to fill
    assert torch.equal(read_dcp(tmp_path / "empty")[0]["x"], torch.ones(2))


# --- hostile and damaged directories --------------------------------------------------------------------------

class Payload:
    """Runs a shell command when unpickled by a trusting reader."""

    def __init__(self, marker: Path, via_eval: bool = False):
        self.marker, self.via_eval = marker, via_eval

    def __reduce__(self):
        if self.via_eval:
            return eval, (f"__import__('os').system('touch {self.marker}')",)
        return os.system, (f"touch {self.marker}",)


def save_with(state: dict, directory: Path, edit_metadata=None) -> None:
    """dcp.save in this process; `edit_metadata(metadata)` may change the Metadata just before it is pickled."""
    import torch.distributed.checkpoint as dcp

    class Writer(dcp.FileSystemWriter):
        def finish(self, metadata, results) -> None:
            if edit_metadata is not None:
                edit_metadata(metadata, {wr.index: wr.storage_data for wrs in results for wr in wrs})
            super().finish(metadata, results)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=Writer(directory), no_dist=True)


@pytest.mark.parametrize("via_eval", [False, True])
def test_payload_in_metadata_is_refused(tmp_path: Path, via_eval: bool) -> None:
    marker = tmp_path / "MARKER"

    def plant(metadata, storage) -> None:
        metadata.planner_data["model.w"] = ("model", Payload(marker, via_eval))

    save_with({"model": {"w": torch.ones(3)}}, tmp_path / "ckpt", plant)
    with pytest.raises(UntrustedPickleError, match="eval" if via_eval else "system"):
        read_dcp(tmp_path / "ckpt")
    assert not marker.exists()


def test_payload_in_a_bytes_item_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    save_with({"model": {"w": torch.ones(3)}, "hook": Payload(marker)}, tmp_path / "ckpt")
    with pytest.raises(UntrustedPickleError, match="system"):
        read_dcp(tmp_path / "ckpt")
    assert not marker.exists()


def test_compressed_items_are_refused(tmp_path: Path) -> None:
    def compress(metadata, storage) -> None:
        for info in storage.values():
            info.transform_descriptors = ["stream.zstd"]

    save_with({"w": torch.ones(3)}, tmp_path / "ckpt", compress)
    with pytest.raises(CheckpointFormatError, match="stream.zstd"):
        read_dcp(tmp_path / "ckpt")


def test_a_file_outside_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.distcp").write_bytes(b"not yours")

    def escape(metadata, storage) -> None:
        for info in storage.values():
            info.relative_path = "../secret.distcp"

    save_with({"w": torch.ones(3)}, tmp_path / "ckpt", escape)
    with pytest.raises(CheckpointFormatError, match="outside the directory"):
        read_dcp(tmp_path / "ckpt")


@dataclasses.dataclass
class RunConfig:
    lr: float = 0.1


def test_unknown_classes_in_values_come_back_as_stand_ins(tmp_path: Path) -> None:
    save_with({"w": torch.ones(3), "config": RunConfig(0.5)}, tmp_path / "ckpt")
    state, names = read_dcp(tmp_path / "ckpt")
    assert names == [f"{__name__}.RunConfig"] and state["config"].state == {"lr": 0.5}
    assert torch.equal(state["w"], torch.ones(3))


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage metadata", "empty metadata"])
def test_damaged_directory_is_corrupt(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "ckpt"
    write_dcp({"model": fastnet(0).state_dict(), "step": 7}, directory)
    distcp = next(directory.glob("*.distcp"))
    if damage == "truncated":
        distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    elif damage == "missing":
        distcp.unlink()
    else:
        (directory / ".metadata").write_bytes(b"" if damage == "empty metadata" else b"\x80\x04not a pickle" * 9)
    with pytest.raises(CheckpointCorruptError) as err:
        read_dcp(directory)
    message = str(err.value)
    assert str(directory) in message and "\n" not in message and "save it again" in message
    assert (".metadata" if "metadata" in damage else distcp.name) in message


def test_is_dcp_directory(tmp_path: Path) -> None:
    assert not is_dcp_directory(tmp_path)
    assert not is_dcp_directory(tmp_path / "nope")
    (tmp_path / "file.pt").write_bytes(b"")
    assert not is_dcp_directory(tmp_path / "file.pt")
    write_dcp({"x": torch.zeros(1)}, tmp_path / "ckpt")
    assert is_dcp_directory(tmp_path / "ckpt")


if __name__ == "__main__":  # a torchrun worker
    _worker(sys.argv[1], sys.argv[2])
