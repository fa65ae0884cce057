"""More layouts people bring: each written by its real tool, loaded through every entry point, or named and refused.

Written by the real tool: torch.jit.save, torch.export.save, torch.save(torch.compile(model)), FSDP1's and
checkpoint_wrapper's named_parameters() (a 1-rank gloo group on CPU), accelerate's save_state,
huggingface_hub's pytorch_model.bin, torch.onnx.export, h5py. By the documented layout: DeepSpeed (model
states, global_stepN/, `latest`, ZeRO-3 placeholders) and Keras 3's .keras zip. Hostile variants of each
new container are refused or read inertly; the payload never runs.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import pickle
import socket
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from test_foreign import CPU, MODELS, Payload, assert_same, build, trained_copy
from torch import nn

from conftest import run_module
from ddp import checkpoint, resume
from ddp.checkpoint.__main__ import main as cli_main
from ddp.checkpoint.keys import strip_wrapper_prefixes, wrapper_segments

INPUT = torch.randn(2, 3, 32, 32)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tools' own deprecation notes (torch.jit, legacy ONNX export)
        return fn(*args, **kwargs)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What EMA helpers and hand-written savers keep: named_parameters() and named_buffers(), wrappers included."""
    return {n: t.detach().clone() for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}


# ----------------------------------------------------------------------------- writers, one per tool


def write_torchscript(model: nn.Module, path: Path) -> None:
    quiet(torch.jit.save, quiet(torch.jit.trace, model.eval(), INPUT, check_trace=False), path)


def write_pt2(model: nn.Module, path: Path) -> Path:
    path = path.with_suffix(".pt2")  # torch.export.save logs a warning for any other name
    quiet(torch.export.save, quiet(torch.export.export, model.eval(), (INPUT,)), path)
    return path


def write_gzip(model: nn.Module, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    out = path.with_name("ckpt.pt.gz")
    out.write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
    path.unlink()
    return out


def write_compiled(model: nn.Module, path: Path) -> None:
    torch.save(torch.compile(model), path)  # torch.compile is lazy: nothing compiles here


def write_compiled_submodule(model: nn.Module, path: Path) -> None:
    """`_orig_mod.` inside the keys, two dicts down: {"model": {"state_dict": ...}}."""
    name, child = next((n, c) for n, c in model.named_children() if any(True for _ in c.parameters()))
    setattr(model, name, torch.compile(child))
    torch.save({"model": {"state_dict": model.state_dict()}}, path)
    setattr(model, name, child)


def write_fsdp1(model: nn.Module, path: Path) -> None:
    """FSDP1 (use_orig_params) wrapping every conv, activation checkpointing around them: both segments at depth."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Conv2d))
        wrapped = quiet(FSDP, model, device_id=torch.device("cpu"), use_orig_params=True,
                        auto_wrap_policy=ModuleWrapPolicy({nn.Sequential}))
        state = named_tensors(wrapped)
    finally:
        dist.destroy_process_group()
    assert any("._fsdp_wrapped_module." in k for k in state) and any("._checkpoint_wrapped_module." in k for k in state)
    assert sorted(strip_wrapper_prefixes(state)) == sorted(expected)
    torch.save({"ema": {"module": state}, "step": 10}, path)  # as an EMA helper keeps them


def write_accelerate(model: nn.Module, path: Path) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator.prepare(model, optimizer)
    accelerator.save_state(path.parent / "state", safe_serialization=False)
    AcceleratorState._reset_state(True)  # the singleton: leave no accelerate state to other tests
    assert {"pytorch_model.bin", "random_states_0.pkl", "optimizer.bin"} <= set(os.listdir(path.parent / "state"))
    return path.parent / "state"


def write_hf_bin(model: nn.Module, path: Path) -> Path:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(model.state_dict(), path.parent, safe_serialization=False)
    (path.parent / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    assert (path.parent / "pytorch_model.bin").is_file()
    return path.parent


def deepspeed_states(state: dict[str, torch.Tensor], stage: int = 2) -> dict:
    """mp_rank_00_model_states.pt as DeepSpeed's engine._save_checkpoint writes it."""
    return {"module": state, "buffer_names": [k for k in state if "running" in k or "batches" in k],
            "optimizer": None, "param_shapes": [{k: v.shape for k, v in state.items()}], "frozen_param_shapes": None,
            "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None,
            "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": 7,
            "global_samples": 224, "dp_world_size": 1, "mp_world_size": 1,
            "ds_config": {"train_batch_size": 32, "zero_optimization": {"stage": stage}}, "ds_version": "0.16.4"}


def write_deepspeed(model: nn.Module, path: Path, tag: str = "global_step7") -> Path:
    root = path.parent / "ds"
    (root / tag).mkdir(parents=True)
    torch.save(deepspeed_states(model.state_dict()), root / tag / "mp_rank_00_model_states.pt")
    (root / "latest").write_text(tag)
    (root / "zero_to_fp32.py").write_text("# DeepSpeed copies its script here\n")
    return root


LOADS = {  # layout -> writer; a writer returning a path names what the loaders are given
    "torchscript": write_torchscript, "pt2": write_pt2, "gzip": write_gzip, "compiled": write_compiled,
    "compiled_submodule": write_compiled_submodule, "fsdp1_ckpt_wrapper_ema": write_fsdp1,
    "accelerate": write_accelerate, "hf_bin": write_hf_bin, "deepspeed": write_deepspeed,
    "deepspeed_tag": lambda m, p: write_deepspeed(m, p) / "global_step7",
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict[str, torch.Tensor]]]:
    out = {}
    for name in MODELS:
        root = tmp_path_factory.mktemp(name)
        for layout, write in LOADS.items():
            model, path = trained_copy(name), root / layout / "ckpt"
            path.parent.mkdir()
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            out[layout, name] = write(model, path) or path, expected
    return out


# ----------------------------------------------------------------------------- every layout, every entry point


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", list(LOADS))
def test_layout_loads_everywhere(written, tmp_path, capsys, layout, name):
    path, expected = written[layout, name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warnings must not reach the user
        weights = checkpoint.load_weights(path)
    assert_same(weights.state, expected)

    model = build(name)
    assert checkpoint.load_into(model, path).ok
    assert_same(model.state_dict(), expected)
    assert_same(checkpoint.load_model_state(path), expected)

    model = build(name)
    resume.init_from(argparse.Namespace(init_from=str(path), checkpoint_key=None, remap=[], min_match=0.5), model, CPU)
    assert_same(model.state_dict(), expected)

    capsys.readouterr()
    assert cli_main(["inspect", str(path), "--model", name]) == 0
    out, err = capsys.readouterr()
    assert "strict load: would succeed" in out and not err
    assert cli_main(["convert", str(path), str(tmp_path / "ours.pt"), "--model", name]) == 0
    assert_same(checkpoint.load_checkpoint(tmp_path / "ours.pt", "cpu")["model"], expected)
    assert cli_main(["export", str(path), str(tmp_path / "w.safetensors"), "--model", name]) == 0
    assert_same(checkpoint.load_weights(tmp_path / "w.safetensors").state, expected)


def test_layouts_are_named(written, capsys):
    layouts = {layout: checkpoint.load_weights(written[layout, "fastnet_small"][0]) for layout in LOADS}
    assert layouts["torchscript"].layout == "TorchScript archive (read without running its code)"
    assert layouts["torchscript"].stand_ins == []  # TorchScript's own __torch__ classes are not news
    assert layouts["pt2"].layout.startswith("torch.export program (.pt2")
    assert layouts["gzip"].layout == "gzip-compressed torch zip, state dict under 'model'"
    assert layouts["compiled"].layout == "pickled nn.Module compiled with torch.compile (read inertly)"
    assert layouts["compiled_submodule"].chosen == "model.state_dict"
    assert "removed wrapper segments `_orig_mod.`" in layouts["compiled_submodule"].note
    fsdp = layouts["fsdp1_ckpt_wrapper_ema"]
    assert fsdp.chosen == "ema.module" and "`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`" in fsdp.note
    assert layouts["accelerate"].layout.startswith("accelerate save_state directory (pytorch_model.bin")
    assert layouts["hf_bin"].layout.startswith("Hugging Face model folder (pytorch_model.bin")
    assert layouts["deepspeed"].layout == "DeepSpeed 0.16.4 model states (ZeRO stage 2), state dict under 'module'"
    capsys.readouterr()
    assert cli_main(["inspect", str(written["fsdp1_ckpt_wrapper_ema", "resnet18"][0]), "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "_fsdp_wrapped_module. _checkpoint_wrapped_module. (stripped when loading)" in out


def test_evaluate_reads_new_layouts(written, tmp_path, tiny_cifar):
    # one process: ddp.evaluate reads through the same dispatcher as the entry points above (a DCP
    # directory through evaluate is in test_foreign.py)
    result = run_module(["ddp.evaluate", "--checkpoint", str(written["deepspeed", "fastnet_small"][0]),
                         "--model", "fastnet_small", "--data-dir", str(tiny_cifar), "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "Warning" not in result.stderr


# ----------------------------------------------------------------------------- keys and weight sets at any depth


def test_wrapper_segments_at_any_depth():
    keys = {"module._orig_mod.layer1._fsdp_wrapped_module.0._checkpoint_wrapped_module.conv.weight": 1,
            "module.blocks.0.module.fc.weight": 2, "head._orig_mod.weight": 3}
    # DDP's `module.` only in front: inside a model it is a real name (timm, DeiT: blocks.N.module)
    assert strip_wrapper_prefixes(keys) == {"layer1.0.conv.weight": 1, "blocks.0.module.fc.weight": 2,
                                            "head.weight": 3}
    assert wrapper_segments(keys) == ["module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."]
    assert strip_wrapper_prefixes({"fc._orig_mod": 1}) == {"fc._orig_mod": 1}  # a tensor's own name stays
    with pytest.raises(checkpoint.CheckpointFormatError, match="both become 'fc.weight'"):
        strip_wrapper_prefixes({"fc._orig_mod.weight": 1, "fc.weight": 2})


def test_weight_sets_at_any_depth_and_dotted_key(tmp_path, capsys):
    state, ema = build("fastnet_small").state_dict(), build("fastnet_small", seed=5).state_dict()
    path = tmp_path / "nested.pt"
    torch.save({"model": {"state_dict": state, "step": 3}, "ema": {"module": ema}, "optimizer": {"state": {}}}, path)
    weights = checkpoint.load_weights(path)
    assert weights.weight_sets == ["model.state_dict", "ema.module"] and weights.chosen == "model.state_dict"
    assert_same(weights.state, state)
    for key in ("ema.module", "ema"):
        assert_same(checkpoint.load_weights(path, checkpoint_key=key).state, ema)
    model = build("fastnet_small", seed=9)
    assert checkpoint.load_into(model, path, checkpoint_key="ema.module").ok
    assert_same(model.state_dict(), ema)
    assert cli_main(["convert", str(path), str(tmp_path / "o.pt"), "--model", "fastnet_small",
                     "--checkpoint-key", "ema.module"]) == 0
    assert_same(checkpoint.load_checkpoint(tmp_path / "o.pt", "cpu")["model"], ema)
    with pytest.raises(checkpoint.CheckpointFormatError, match="'model.state_dict', 'ema.module'"):
        checkpoint.load_weights(path, checkpoint_key="teacher")


# ----------------------------------------------------------------------------- named and refused, never "corrupted"


def write_onnx(path: Path) -> None:
    quiet(torch.onnx.export, build("fastnet_small").eval(), (INPUT[:1],), str(path), dynamo=False)


def write_keras_h5(path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:  # what keras.Model.save("model.h5") writes: attributes and weight groups
        f.attrs["keras_version"], f.attrs["backend"] = "2.15.0", "tensorflow"
        f.create_group("model_weights").create_dataset("dense/kernel:0", data=[[0.5, 1.5]])


def write_keras_v3(path: Path) -> None:
    write_zip(path, {  # keras.saving.save_model's .keras: a zip of these three
        "metadata.json": json.dumps({"keras_version": "3.8.0", "date_saved": "2025-01-01"}),
        "config.json": json.dumps({"class_name": "Sequential", "config": {}}),
        "model.weights.h5": b"\x89HDF\r\n\x1a\n" + bytes(56)})


def write_zip(path: Path, records: dict[str, str | bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)


REFUSED = {  # (file name, writer, what the one line must say)
    "onnx": ("model.onnx", write_onnx, "is an ONNX model; ddp-cifar reads PyTorch weights: .*onnx2torch"),
    "keras_h5": ("model.h5", write_keras_h5, r"is an HDF5 file \(a Keras .h5 model"),
    "keras_v3": ("model.keras", write_keras_v3, r"is a Keras 3 .keras model"),
    "onnx_renamed": ("model.pt", write_onnx, "is an ONNX model"),  # recognised by content, not name
    "tflite": ("m.tflite", lambda p: p.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64)), "TensorFlow Lite"),
    "xz": ("m.pt.xz", lambda p: p.write_bytes(b"\xfd7zXZ\x00" + bytes(64)), r"xz-compressed; decompress it first"),
    "zip_of_files": ("bundle.zip", lambda p: write_zip(p, {"notes.txt": "hi"}),
                     r"a zip archive of 1 files \(notes.txt\), not a torch.save checkpoint; extract it"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_other_formats_are_named_not_called_corrupted(tmp_path, capsys, kind):
    name, write, message = REFUSED[kind]
    path = tmp_path / name
    write(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(checkpoint.CheckpointFormatError, match=message) as err:
            checkpoint.load_weights(path)
    assert "corrupt" not in str(err.value) and "damaged" not in str(err.value)
    with pytest.raises(checkpoint.CheckpointFormatError, match=message):
        checkpoint.load_into(build("fastnet_small"), path)
    capsys.readouterr()
    assert cli_main(["inspect", str(path)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "weights_only" not in err_lines[0], err_lines


def test_tensorflow_saved_model_directory_is_named(tmp_path):
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01\x12\x00")
    with pytest.raises(checkpoint.CheckpointFormatError, match="is a TensorFlow SavedModel directory"):
        checkpoint.load_weights(tmp_path)


def test_unknown_bytes_are_not_called_corrupted_and_damage_still_is(tmp_path):
    (tmp_path / "text.pt").write_bytes(b"hello, this is not a checkpoint\n" * 4)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="in no checkpoint format this reader knows"):
        checkpoint.load_weights(tmp_path / "text.pt")
    good = tmp_path / "good.pt"
    torch.save(build("fastnet_small").state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])  # a damaged file is still called so
    with pytest.raises(checkpoint.CheckpointCorruptError, match="truncated, corrupted"):
        checkpoint.load_weights(tmp_path / "cut.pt")
    (tmp_path / "cut.pt.gz").write_bytes(gzip.compress(good.read_bytes())[:3000])
    with pytest.raises(checkpoint.CheckpointCorruptError, match="damaged gzip"):
        checkpoint.load_weights(tmp_path / "cut.pt.gz")


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3, tags


def test_deepspeed_zero3_placeholders_name_zero_to_fp32(tmp_path, capsys):
    model = build("resnet18")
    state, params = model.state_dict(), dict(model.named_parameters())
    placeholders = {k: torch.empty(0) if k in params else v for k, v in state.items()}
    tag = tmp_path / "global_step3"
    tag.mkdir()
    states = deepspeed_states(placeholders, stage=3)
    states["param_shapes"] = [{k: p.shape for k, p in params.items()}]
    torch.save(states, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("global_step3\n")
    message = r"DeepSpeed ZeRO-3 checkpoint: .*partition placeholders .*run `python zero_to_fp32.py . fp32` in"
    for path in (tmp_path, tag, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        with pytest.raises(checkpoint.CheckpointFormatError, match=message):
            checkpoint.load_into(build("resnet18"), path)
    assert cli_main(["inspect", str(tmp_path), "--model", "resnet18"]) == 2
    assert "zero_to_fp32.py" in capsys.readouterr().err
    torch.save(states, tag / "mp_rank_00_model_states.pt")  # the same placeholders under the stage-1/2 name
    with pytest.raises(checkpoint.CheckpointFormatError, match="ZeRO-3"):
        checkpoint.load_weights(tag)


@pytest.mark.parametrize("tag", ["../elsewhere", "/etc", "global_step1/../../x", "..", "link"])
def test_deepspeed_latest_tag_stays_inside(tmp_path, tag):
    root, outside = tmp_path / "ds", tmp_path / "elsewhere"
    (root / "global_step1").mkdir(parents=True)
    outside.mkdir()
    torch.save(deepspeed_states(build("fastnet_small").state_dict()), root / "global_step1" / "mp_rank_00_model_states.pt")
    torch.save(deepspeed_states(build("fastnet_small").state_dict()), outside / "mp_rank_00_model_states.pt")
    (root / "link").symlink_to(outside)
    (root / "latest").write_text(tag)
    with pytest.raises(checkpoint.CheckpointFormatError, match="refused"):
        checkpoint.load_weights(root)


# ----------------------------------------------------------------------------- hostile variants: nothing runs


class Config:
    pass


class OtherGetattr:
    """getattr(obj, "get_compiler_config") on anything but torch's Inductor wrapper: not what torch.compile pickles."""

    def __reduce__(self):
        return getattr, (Config(), "get_compiler_config")


def test_only_torch_compiles_getattr_is_tolerated(written, tmp_path):
    assert checkpoint.load_weights(written["compiled", "fastnet_small"][0]).state  # torch's own getattr: read
    state = build("fastnet_small").state_dict()
    for other in (OtherGetattr(), getattr):  # another call; getattr itself, uncalled, left in the object
        torch.save({"state_dict": state, "x": other}, tmp_path / "e.pt")
        with pytest.raises(checkpoint.UntrustedPickleError, match="builtins.getattr"):
            checkpoint.load_weights(tmp_path / "e.pt")


def test_payload_in_a_torchscript_archive_is_refused(written, tmp_path):
    marker = tmp_path / "pwned"
    src, evil = written["torchscript", "fastnet_small"][0], tmp_path / "evil.pt"
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(evil, "w") as out:
        for record in archive.infolist():
            data = archive.read(record)
            if record.filename.endswith("/data.pkl"):
                data = pickle.dumps({"training": True, "hook": Payload(marker)}, protocol=2)
            out.writestr(record, data)
    with pytest.raises(checkpoint.UntrustedPickleError, match="posix.system"):
        checkpoint.load_weights(evil)
    assert not marker.exists()


def test_payload_in_accelerate_random_states_is_never_read(written, tmp_path):
    import shutil

    marker = tmp_path / "pwned"
    src, expected = written["accelerate", "fastnet_small"]
    state = shutil.copytree(src, tmp_path / "state")
    (state / "random_states_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    assert_same(checkpoint.load_weights(state).state, expected)
    torch.save({**expected, "hook": Payload(marker)}, state / "pytorch_model.bin")
    with pytest.raises(checkpoint.UntrustedPickleError):
        checkpoint.load_weights(state)
    assert not marker.exists()


def test_payload_in_deepspeed_states_and_gzip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    tag = tmp_path / "global_step1"
    tag.mkdir()
    states = {**deepspeed_states(build("fastnet_small").state_dict()), "lr_scheduler": Payload(marker)}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("global_step1")
    (tmp_path / "evil.pt.gz").write_bytes(gzip.compress((tag / "mp_rank_00_model_states.pt").read_bytes()))
    for path in (tmp_path, tag, tmp_path / "evil.pt.gz"):
        with pytest.raises(checkpoint.UntrustedPickleError, match="posix.system"):
            checkpoint.load_weights(path)
    assert not marker.exists()


def test_gzip_bounds(tmp_path):
    bomb = tmp_path / "bomb.pt.gz"
    with gzip.open(bomb, "wb") as f:  # 80 MiB of zeros in ~80 KB: beyond 8x its size plus 64 MiB
        for _ in range(80):
            f.write(bytes(1 << 20))
    with pytest.raises(checkpoint.CheckpointFormatError, match="gzip bomb"):
        checkpoint.load_weights(bomb)
    (tmp_path / "twice.gz").write_bytes(gzip.compress(gzip.compress(b"PK\x03\x04")))
    with pytest.raises(checkpoint.CheckpointFormatError, match="gzip inside gzip"):
        checkpoint.load_weights(tmp_path / "twice.gz")
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(".ddp-gunzip-*"))


def test_crafted_pt2_weight_maps_are_refused(written, tmp_path):
    src = written["pt2", "fastnet_small"][0]

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, evil)

    def variant(change, first_weight: bytes | None = None) -> Path:
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}.pt2"
        with zipfile.ZipFile(src) as archive, zipfile.ZipFile(out, "w") as dst:
            for record in archive.infolist():
                data = archive.read(record)
                if record.filename.endswith("model_weights_config.json"):
                    config = json.loads(data)
                    change(next(iter(config["config"].values())))
                    data = json.dumps(config).encode()
                elif record.filename.endswith("/weights/weight_0") and first_weight is not None:
                    data = first_weight
                dst.writestr(record, data)
        return out

    def past_the_end(entry):
        entry["tensor_meta"]["strides"][0]["as_int"] *= 1000

    def broadcast_bomb(entry):  # 2**40 elements over one stored row: refused before anything is allocated
        entry["tensor_meta"]["sizes"][0]["as_int"], entry["tensor_meta"]["strides"][0]["as_int"] = 1 << 40, 0

    def outside(entry):
        entry["path_name"] = "../../models/model.json"

    def pickled(entry):
        entry["use_pickle"] = True

    for change, error, message in [(past_the_end, checkpoint.CheckpointCorruptError, "reaches past"),
                                   (broadcast_bomb, checkpoint.CheckpointFormatError, "more elements than"),
                                   (outside, checkpoint.CheckpointFormatError, "not a record in"),
                                   (pickled, checkpoint.CheckpointCorruptError, "weight whiten.weight is in no checkpoint format")]:
        with pytest.raises(error, match=message):
            checkpoint.load_weights(variant(change))
    with pytest.raises(checkpoint.UntrustedPickleError, match="posix.system"):  # a payload in a pickled weight
        checkpoint.load_weights(variant(pickled, evil.read_bytes()))
    assert not marker.exists()
