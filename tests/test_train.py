"""The real trainer under the real torchrun: 2 processes, gloo, synthetic data."""

from __future__ import annotations

import re

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import run_module
from ddp import models


def test_two_process_torchrun_run_learns_and_logs_to_tensorboard(tmp_path):
    result = run_module(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "ddp.train", "--model", "fastnet_small",
                         "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "128",
                         "--epochs", "3", "--log-every", "4", "--run-name", "smoke", "--eval-every", "1",
                         "--logdir", "runs", "--checkpoint-dir", "ckpt"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    assert "world 2 x cpu (gloo)" in out and "batch 128 global = 2 x 64" in out
    assert "SYNTHETIC data" in out
    epochs = re.findall(r"epoch (\d)/3 \| train loss ([\d.]+) \| test loss ([\d.]+) acc ([\d.]+)% \((\w+) TTA\)", out)
    assert [e[0] for e in epochs] == ["1", "2", "3"]  # printed once, by rank 0 only
    assert [e[4] for e in epochs] == ["no", "no", "unsure"]  # test-time augmentation only for the final figure
    train_losses = [float(e[1]) for e in epochs]
    assert train_losses[-1] < train_losses[0] - 0.2
    assert float(epochs[-1][3]) > 50

    events = EventAccumulator(str(tmp_path / "runs" / "smoke")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "test/loss", "test/acc", "perf/images_per_sec",
            "perf/epoch_time_s"} <= set(tags["scalars"])
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]  # steps 4 and 8 of each epoch
    assert [e.step for e in events.Scalars("test/acc")] == [8, 16, 24]
    assert abs(events.Scalars("test/acc")[-1].value * 100 - float(epochs[-1][3])) < 0.01
    assert len(list((tmp_path / "runs").iterdir())) == 1  # one writer: rank 0

    # The HParams dashboard: the run's flags, and its final and best metrics as the metric columns.
    flags, metric_tags, status = read_hparams(events)
    assert flags["model"] == "fastnet_small" and flags["batch_size"] == 128 and flags["run_name"] == "smoke"
    assert flags["lookahead"] == 0 and flags["tta"] == "unsure" and "remap" in flags  # a list, as text
    assert set(metric_tags) == {"final/test_acc", "final/best_test_acc", "final/test_loss", "final/train_loss"}
    assert status == "STATUS_SUCCESS"
    assert events.Scalars("final/test_acc")[-1].value == events.Scalars("test/acc")[-1].value
    assert events.Scalars("final/test_acc")[-1].step == 24

    # A second fresh run with the same flags (another checkpoint directory) gets a TensorBoard run of its own.
    again = run_module(["ddp.train", "--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "256",
                        "--batch-size", "128", "--epochs", "1", "--run-name", "smoke", "--checkpoint-dir", "ckpt2"],
                       cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["smoke", "smoke-v2"]
    assert len(EventAccumulator(str(tmp_path / "runs" / "smoke")).Reload().Scalars("test/acc")) == 3  # untouched
    flags, _, _ = read_hparams(EventAccumulator(str(tmp_path / "runs" / "smoke-v2")).Reload())
    assert flags["run_name"] == "smoke-v2" and flags["checkpoint_dir"] == "ckpt2"
    assert torch.load(tmp_path / "ckpt2" / "latest.pt", weights_only=True)["config"]["run_name"] == "smoke-v2"


def read_hparams(events: EventAccumulator) -> tuple[dict, list[str], str]:
    """(flags, metric tags, session status) of a run, as TensorBoard's HParams plugin reads them."""
    content = events.PluginTagToContent("hparams")
    data = {tag: HParamsPluginData.FromString(c) for tag, c in content.items()}
    start = data["_hparams_/session_start_info"].session_start_info
    flags = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    metrics = [m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos]
    status = Status.Name(data["_hparams_/session_end_info"].session_end_info.status)
    return flags, metrics, status


def test_compiled_ddp_model_trains_and_saves_canonical_keys(tmp_path):
    result = run_module(["ddp.train", "--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "512",
                         "--batch-size", "128",
                         "--epochs", "2", "--compile"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "epoch 2/2" in result.stdout
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["model"]
    assert list(saved) == list(models.build("fastnet_small").state_dict())  # no module. / _orig_mod.
