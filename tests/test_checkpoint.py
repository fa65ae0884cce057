"""ddp.checkpoint: prefixes, atomic save, safe load, foreign layouts, resume state, directories, CLI.

CPU only, real files in tmp_path, no mocks. CLI tests mostly call main() in-process; a few run
`python -m ddp.checkpoint` for real (each launch imports torch, ~2 s).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import retag_storages
from ddp.checkpoint import (
    FORMAT,
    WEIGHTS_FORMAT,
    BackgroundWriter,
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointWriteError,
    UntrustedPickleError,
    capture_rng,
    cpu_copy,
    detect_prefixes,
    diff_state,
    epoch_checkpoint_name,
    extract_model_state,
    load_checkpoint,
    load_into,
    load_model_state,
    load_state_into,
    load_weights,
    make_checkpoint,
    newest_valid_checkpoint,
    parse_remap,
    prune_epoch_checkpoints,
    remap_prefixes,
    restore_checkpoint,
    restore_rng,
    save_checkpoint,
    strip_wrapper_prefixes,
    unwrap_model,
)
from ddp.checkpoint.__main__ import main as cli_main
from ddp.optim import Lookahead

REPO = Path(__file__).resolve().parent.parent


def tiny_model(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Local stand-in for ddp.models: conv + batchnorm (buffers) + linear, on 8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes))


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddp.checkpoint", *args], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=120)


def leftover_temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- prefixes and wrappers

@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_strip_wrapper_prefixes(prefix):
    state = tiny_model().state_dict()
    stripped = strip_wrapper_prefixes({prefix + k: v for k, v in state.items()})
    assert list(stripped) == list(state)


def test_strip_collision_names_both_keys():
    w = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'module\.fc\.weight'.*'fc\.weight'"):
        strip_wrapper_prefixes({"module.fc.weight": w, "fc.weight": w})


def test_remap_and_parse_remap():
    state = {"backbone.conv.weight": 1, "backbone.fc.bias": 2, "head.weight": 3}
    rules = [parse_remap("backbone.fc.=fc."), parse_remap("backbone.="), parse_remap("head.=classifier.")]
    assert remap_prefixes(state, rules) == {"conv.weight": 1, "fc.bias": 2, "classifier.weight": 3}
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_remap("backbone.")
    assert detect_prefixes(["module._orig_mod.backbone.conv.weight"]) == ["module.", "_orig_mod.", "backbone."]


def test_unwrap_model_through_compile_and_dataparallel():
    model = tiny_model()
    for wrapped in (torch.compile(model), nn.DataParallel(model), nn.DataParallel(torch.compile(model)),
                    torch.compile(nn.DataParallel(model))):
        assert unwrap_model(wrapped) is model
    assert next(iter(nn.DataParallel(model).state_dict())).startswith("module.")


# ----------------------------------------------------------------------------- diff and load_state_into

def test_strict_mismatch_error_and_partial_load():
    model, other = tiny_model(10), tiny_model(100, seed=1)
    diff = diff_state(model.state_dict(), other.state_dict())
    assert diff.shape_mismatch == [("3.weight", (100, 144), (10, 144)), ("3.bias", (100,), (10,))]
    assert not diff.missing and not diff.unexpected and not diff.ok
    assert "3.weight 100x144 in checkpoint vs 10x144 in model" in diff.report()
    with pytest.raises(CheckpointMismatchError, match="2 shape mismatch.*--init-from") as err:
        load_state_into(model, other.state_dict())
    assert err.value.diff == diff
    assert "\n" not in str(err.value)

    before = model.state_dict()["3.weight"].clone()
    state = {"module." + k: v for k, v in other.state_dict().items()}
    state["extra.weight"] = torch.zeros(1)
    diff = load_state_into(nn.DataParallel(model), state, strict=False)
    assert diff.unexpected == ["extra.weight"] and len(diff.shape_mismatch) == 2
    assert torch.equal(model[0].weight, other[0].weight)  # what fits was loaded
    assert torch.equal(model[3].weight, before)  # what doesn't was left alone


# ----------------------------------------------------------------------------- save / load files

def test_save_load_roundtrip_creates_directory(tmp_path):
    model = tiny_model()
    path = tmp_path / "new" / "dir" / "w.pt"
    save_checkpoint({"model": model.state_dict(), "n": 3}, path)
    loaded = load_checkpoint(path, map_location="cpu")
    assert loaded["n"] == 3
    assert_same_state(loaded["model"], model.state_dict())
    assert leftover_temp_files(path.parent) == []
    fresh = tiny_model(seed=5)
    assert load_into(fresh, path).ok
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_failed_save_keeps_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "latest.pt"
    good = {"model": tiny_model().state_dict()}
    save_checkpoint(good, path)
    with pytest.raises(CheckpointWriteError, match="latest.pt.*untouched") as err:
        save_checkpoint({"model": tiny_model().state_dict(), "bad": lambda: 0}, path)  # lambdas can't be pickled
    assert isinstance(err.value, OSError) and "\n" not in str(err.value)
    assert_same_state(load_checkpoint(path, "cpu")["model"], good["model"])
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_extra_names_are_hard_links_that_part_when_one_is_saved_again(tmp_path):
    first, second = {"w": torch.arange(10.0)}, {"w": -torch.arange(10.0)}
    names = [tmp_path / n for n in ("best.pt", "epoch_0001.pt", "latest.pt")]
    save_checkpoint(first, *names)
    assert len({p.stat().st_ino for p in names}) == 1 and names[0].stat().st_nlink == 3  # written once
    held = load_checkpoint(names[2], "cpu")["w"]  # mapped from the file that is about to be replaced
    save_checkpoint(second, names[2])
    assert torch.equal(load_checkpoint(names[2], "cpu")["w"], second["w"])
    for path in names[:2]:
        assert torch.equal(load_checkpoint(path, "cpu")["w"], first["w"]) and path.stat().st_nlink == 2
    assert torch.equal(held, first["w"])  # what was loaded never changes under its holder
    assert leftover_temp_files(tmp_path) == []


def test_extra_name_on_another_file_system_is_a_copy(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than tmp_path")
    other = shm / f"ddp-cifar-test-{os.getpid()}.pt"
    try:
        save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.pt", other)  # os.link fails with EXDEV: copied
        assert other.read_bytes() == (tmp_path / "a.pt").read_bytes()
        assert torch.equal(load_checkpoint(other, "cpu")["w"], torch.ones(3))
        assert not [p for p in shm.iterdir() if p.name.startswith(f".{other.name}.")]
    finally:
        other.unlink(missing_ok=True)


def test_crc_check_catches_a_flipped_byte_inside_a_tensor_record(tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint({"w": torch.arange(4096.0)}, path)
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"w.pt is corrupted: record \S+/data/0 fails its CRC32"):
        load_checkpoint(path, "cpu")


def test_cpu_copy_is_independent_of_the_live_state():
    model = tiny_model()
    state = {"model": model.state_dict(), "rng": [torch.ones(2), 3], "note": {"lr": 0.1}}
    copied = cpu_copy(state)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    state["note"]["lr"] = 0.2
    assert not torch.equal(copied["model"]["0.weight"], model[0].weight)
    assert type(copied["model"]) is type(state["model"]) and copied["note"] == {"lr": 0.1}
    assert torch.equal(copied["rng"][0], torch.ones(2)) and copied["rng"][1] == 3


def test_background_writer_runs_one_write_at_a_time():
    writer, lock, running, most = BackgroundWriter(), threading.Lock(), [0], [0]

    def write() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    writer.submit(write)
    assert writer.busy  # submit() returned while the write goes on
    for _ in range(3):
        writer.submit(write)  # waits for the one before
    writer.wait()
    assert most == [1] and not writer.busy


def test_background_write_failure_is_raised_by_the_next_wait_or_submit(tmp_path):
    (tmp_path / "not_a_dir").write_text("a file where the checkpoint directory should be")
    writer = BackgroundWriter()

    def failing() -> None:
        save_checkpoint({"w": torch.ones(3)}, tmp_path / "not_a_dir" / "latest.pt")

    writer.submit(failing)
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint .*not_a_dir/latest.pt"):
        writer.wait()
    writer.wait()  # raised once, then forgotten
    writer.submit(failing)
    with pytest.raises(CheckpointWriteError, match="not_a_dir/latest.pt"):
        writer.submit(lambda: None)  # the next save learns of it before it starts
    writer.wait()
    assert (tmp_path / "not_a_dir").read_text().startswith("a file")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt", "cpu")


@pytest.mark.parametrize("kind", ["truncated", "zero", "garbage", "text"])
def test_corrupt_files(tmp_path, kind):
    good = tmp_path / "good.pt"
    torch.save(tiny_model().state_dict(), good)
    data = good.read_bytes()
    content = {"truncated": data[: len(data) // 2], "zero": b"", "garbage": np.random.default_rng(0).bytes(4096),
               "text": b"not a checkpoint\n" * 50}[kind]
    path = tmp_path / f"{kind}.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointCorruptError, match=f"{kind}.pt"):
        load_checkpoint(path, "cpu")


def test_whole_pickled_model_loads_inertly(tmp_path):
    model = tiny_model()
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # the classes are importable here, yet none is imported without trust_pickle
    weights = load_weights(path)
    assert weights.layout == "pickled nn.Module (read inertly)"
    assert "torch.nn.modules.conv.Conv2d" in weights.stand_ins
    assert_same_state(weights.state, model.state_dict())
    assert_same_state(load_model_state(path, trust_pickle=True), model.state_dict())


class Malicious:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling would call open(marker, "w"), creating the file
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-4"])
def test_malicious_pickle_is_refused(tmp_path, how):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"model": tiny_model().state_dict(), "x": Malicious(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(Malicious(marker), protocol=int(how[-1])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocol 4
        with pytest.raises((UntrustedPickleError, CheckpointCorruptError)):
            load_checkpoint(path, "cpu")
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["model", "state_dict", "model_state_dict", "net", "module", "bare", "ours"])
def test_layouts_recognised(tmp_path, layout):
    model = tiny_model()
    state = {"module." + k: v for k, v in model.state_dict().items()}  # as saved from a DDP model
    if layout == "bare":
        obj = state
    elif layout == "ours":
        obj = make_checkpoint(model, None, None, None, progress={}, metrics={}, config={}, world_size=1,
                              device_type="cpu")
    else:
        obj = {layout: state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "best_acc": 0.9}
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    assert_same_state(load_model_state(path), model.state_dict())


def test_unknown_layout_lists_keys():
    with pytest.raises(CheckpointFormatError, match="'weights', 'epoch'"):
        extract_model_state({"weights": [1, 2], "epoch": 3})
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format 'ddp-cifar/99'"):
        extract_model_state({"format": "ddp-cifar/99", "model": {}})


def test_cuda_tagged_checkpoint_loads_on_cpu(tmp_path):
    state = tiny_model().state_dict()
    torch.save({"model": state}, tmp_path / "cpu.pt")
    retag_storages(tmp_path / "cpu.pt", tmp_path / "cuda.pt", "cuda:0")
    if not torch.cuda.is_available():  # proves the file really is CUDA-tagged
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "cuda.pt", weights_only=True)
    loaded = load_checkpoint(tmp_path / "cuda.pt", map_location="cpu")
    assert all(t.device.type == "cpu" for t in loaded["model"].values())
    assert_same_state(loaded["model"], state)


# ----------------------------------------------------------------------------- resume state

def train_steps(model, optimizer, scheduler, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def make_training(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return optimizer, scheduler, torch.amp.GradScaler("cpu")


def test_resume_roundtrip_into_dataparallel(tmp_path):
    model = tiny_model()
    optimizer, scheduler, scaler = make_training(model)
    train_steps(model, optimizer, scheduler, 3, seed=1)
    config = {"model": "tiny", "lr": 0.1, "out": tmp_path, "sizes": (1, 2), "flag": True, "seed": np.int64(3)}
    ckpt = make_checkpoint(torch.compile(model), optimizer, scheduler, scaler, progress={"epoch": 1, "step": 3},
                           metrics={"best_acc": np.float64(0.5), "acc": torch.tensor(0.4), "loss": 1.5},
                           config=config, world_size=2, device_type="cpu")
    save_checkpoint(ckpt, tmp_path / "latest.pt")
    loaded = load_checkpoint(tmp_path / "latest.pt", "cpu")  # weights_only: everything is plain
    assert loaded["format"] == FORMAT and not any(k.startswith("module.") for k in loaded["model"])
    assert loaded["progress"] == {"epoch": 1, "step": 3, "batch_in_epoch": 0}
    assert loaded["metrics"] == {"best_acc": 0.5, "acc": pytest.approx(0.4), "loss": 1.5}
    assert loaded["config"] == {"model": "tiny", "lr": 0.1, "out": str(tmp_path), "sizes": [1, 2], "flag": True,
                                "seed": 3}
    assert loaded["env"]["world_size"] == 2 and type(loaded["env"]["torch"]) is str

    fresh = tiny_model(seed=7)
    wrapped = nn.DataParallel(fresh)
    optimizer2, scheduler2, scaler2 = make_training(wrapped)
    restore_checkpoint(loaded, wrapped, optimizer2, scheduler2, scaler2)
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert scheduler2.last_epoch == 3 and scaler2.state_dict() == scaler.state_dict()
    momentum = optimizer2.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    train_steps(model, optimizer, scheduler, 2, seed=2)  # continuing gives the same weights either way
    train_steps(wrapped, optimizer2, scheduler2, 2, seed=2)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_restore_rejects_foreign_format():
    with pytest.raises(CheckpointFormatError, match="--init-from"):
        restore_checkpoint({"state_dict": {}}, tiny_model())
    with pytest.raises(CheckpointFormatError, match=WEIGHTS_FORMAT):
        restore_checkpoint({"format": WEIGHTS_FORMAT, "model": {}}, tiny_model())


def draw() -> tuple:
    return random.random(), np.random.rand(), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_roundtrip_through_file(tmp_path):
    state = capture_rng()
    expected = draw()
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    loaded = load_checkpoint(tmp_path / "rng.pt", "cpu")["rng"]
    loaded["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # as if saved on an 8-GPU box
    draw()
    restore_rng(loaded)
    assert draw() == expected
    restore_rng(None)  # converted checkpoints carry no RNG state


# ----------------------------------------------------------------------------- directories

def test_prune_keeps_newest(tmp_path):
    for epoch in (1, 2, 3, 10, 11):
        (tmp_path / epoch_checkpoint_name(epoch)).write_bytes(b"x")
    (tmp_path / "latest.pt").write_bytes(b"x")
    assert epoch_checkpoint_name(3) == "epoch_0003.pt"
    assert prune_epoch_checkpoints(tmp_path, keep=0) == []
    removed = prune_epoch_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0010.pt", "epoch_0011.pt", "latest.pt"]


def test_newest_valid_skips_corrupt(tmp_path):
    assert newest_valid_checkpoint(tmp_path / "none", "cpu") is None
    save_checkpoint({"epoch": 1}, tmp_path / epoch_checkpoint_name(1))
    save_checkpoint({"epoch": 2}, tmp_path / epoch_checkpoint_name(2))
    (tmp_path / epoch_checkpoint_name(3)).write_bytes(b"")
    (tmp_path / "latest.pt").write_bytes(b"\x80\x02garbage")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint") as record:
        path, ckpt = newest_valid_checkpoint(tmp_path, "cpu")
    assert path.name == "epoch_0002.pt" and ckpt == {"epoch": 2}
    assert ["latest.pt" in str(w.message) for w in record] == [True, False]
    assert "epoch_0003.pt" in str(record[1].message)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def ours(tmp_path) -> Path:
    model = tiny_model()
    optimizer, scheduler, scaler = make_training(model)
    ckpt = make_checkpoint(model, optimizer, scheduler, scaler, Lookahead(model, 100),
                           progress={"epoch": 4, "step": 40},
                           metrics={"best_acc": 0.75, "acc": 0.7, "loss": 0.9},
                           config={"model": "tiny", "num_classes": 10}, world_size=2, device_type="cuda")
    save_checkpoint(ckpt, tmp_path / "ours.pt")
    return tmp_path / "ours.pt"


def test_cli_inspect_text_and_json(ours, capsys):
    assert cli_main(["inspect", str(ours)]) == 0
    text = capsys.readouterr().out
    assert "ddp-cifar/1" in text and "epoch 4" in text and "world_size 2" in text and "3.weight" in text

    result = run_cli("inspect", str(ours), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == FORMAT and info["progress"]["epoch"] == 4 and info["metrics"]["best_acc"] == 0.75
    assert info["env"]["device"] == "cuda" and info["file_size"] == ours.stat().st_size
    assert info["numel"] == sum(t.numel() for t in tiny_model().state_dict().values())
    assert {"name": "3.bias", "shape": [10], "dtype": "float32"} in info["keys"]
    assert info["has"] == {"optimizer": True, "scheduler": True, "scaler": True, "lookahead": True}


def test_cli_inspect_with_ddp_models(tmp_path, capsys):
    """Uses the real model zoo (ddp.models), with 'fastnet' as a small registered model."""
    models = pytest.importorskip("ddp.models")
    model = models.build("fastnet", 10)
    path = tmp_path / "fast.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    assert cli_main(["inspect", str(path), "--model", "fastnet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prefixes"] == ["module."] and info["model"]["strict_load_ok"]
    kinds = {k["name"]: k["kind"] for k in info["keys"]}
    assert {"parameter", "frozen parameter", "buffer"} == set(kinds.values())
    assert kinds["whiten.weight"] == "frozen parameter" and kinds["layers.0.2.running_mean"] == "buffer"
    assert cli_main(["inspect", str(path), "--model", "fastnet", "--num-classes", "100"]) == 0
    text = capsys.readouterr().out
    assert "shape mismatch" in text and "strict load: would fail" in text


def test_cli_export(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ddp import models

    ours = tmp_path / "fastnet.pt"
    save_checkpoint(make_checkpoint(models.build("fastnet_small", 10), None, None, None, progress={}, metrics={},
                                    config={"model": "fastnet_small", "num_classes": 10}, world_size=1,
                                    device_type="cpu"), ours)
    state = load_model_state(ours)
    assert cli_main(["export", str(ours), str(tmp_path / "w.pt")]) == 0
    weights = load_checkpoint(tmp_path / "w.pt", "cpu")
    assert weights["format"] == WEIGHTS_FORMAT and weights["model_name"] == "fastnet_small"
    assert weights["num_classes"] == 10
    assert len(weights["mean"]) == 3 and len(weights["std"]) == 3
    assert_same_state(weights["model"], state)

    result = run_cli("export", str(ours), str(tmp_path / "w.safetensors"), "--safetensors")
    assert result.returncode == 0, result.stderr
    assert_same_state(dict(sorted(load_file(tmp_path / "w.safetensors").items())), dict(sorted(state.items())))
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == WEIGHTS_FORMAT and meta["model_name"] == "fastnet_small"
    assert len(json.loads(meta["mean"])) == 3
    assert leftover_temp_files(tmp_path) == []
    # export checks the weights against the model it names, as evaluate does, and writes nothing otherwise
    assert cli_main(["export", str(ours), str(tmp_path / "bad.pt"), "--model", "resnet18"]) == 2
    assert not (tmp_path / "bad.pt").exists()


def test_cli_convert_of_our_checkpoint_keeps_the_training_state(ours, tmp_path, capsys):
    assert cli_main(["convert", str(ours), str(tmp_path / "again.pt")]) == 0
    assert "optimizer, scheduler, scaler, lookahead; epoch 4" in capsys.readouterr().out
    before, after = load_checkpoint(ours, "cpu"), load_checkpoint(tmp_path / "again.pt", "cpu")
    assert_same_state(after["lookahead"], before["lookahead"])
    assert after["progress"] == before["progress"] and after["rng"]["torch"].equal(before["rng"]["torch"])


def test_cli_convert(tmp_path, capsys):
    model = tiny_model()
    optimizer, _, _ = make_training(model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": 7, "best_acc1": 91.5}, foreign)
    assert cli_main(["convert", str(foreign), str(tmp_path / "a.pt"), "--model", "tiny"]) == 0
    converted = load_checkpoint(tmp_path / "a.pt", "cpu")
    assert converted["format"] == FORMAT and converted["config"]["model"] == "tiny"
    assert converted["progress"]["epoch"] == 7 and converted["metrics"]["best_acc"] == 91.5
    assert converted["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert_same_state(converted["model"], model.state_dict())

    whole = tmp_path / "whole.pt"
    torch.save(model, whole)  # read inertly: no class imported, the weights come back
    assert cli_main(["convert", str(whole), str(tmp_path / "b.pt")]) == 0
    assert_same_state(load_checkpoint(tmp_path / "b.pt", "cpu")["model"], model.state_dict())
    assert cli_main(["convert", str(whole), str(tmp_path / "c.pt"), "--trust-pickle"]) == 0
    assert_same_state(load_checkpoint(tmp_path / "c.pt", "cpu")["model"], model.state_dict())
    torch.save({"model": model, "hook": Malicious(tmp_path / "pwned")}, tmp_path / "evil.pt")
    result = run_cli("convert", str(tmp_path / "evil.pt"), str(tmp_path / "d.pt"))
    assert result.returncode == 2 and not (tmp_path / "d.pt").exists() and not (tmp_path / "pwned").exists()
    assert result.stderr.count("\n") == 1 and "io.open" in result.stderr and "Traceback" not in result.stderr
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
