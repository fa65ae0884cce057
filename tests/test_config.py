from __future__ import annotations

import pytest

from conftest import run_module
from ddp import config


@pytest.mark.parametrize("argv, world_size, message", [
    (["--epochs", "-1"], 1, "--epochs must be at least 1, got -1"),
    (["--model", "vgg"], 1, "unknown model 'vgg'; choose one of fastnet"),
    (["--batch-size", "2"], 4, "--batch-size 2 is smaller than the 4 processes"),
    (["--batch-size", "510"], 4, "does not split evenly across 4 processes; use a multiple of 4"),
    (["--dataset", "synthetic", "--synthetic-size", "100"], 1, "larger than the 100 training images"),
    (["--lr", "0"], 1, "--lr must be positive"),
    (["--device", "cpu", "--backend", "nccl"], 1, "--backend nccl needs CUDA"),
    (["--dataset", "imagenet"], 1, "invalid choice: 'imagenet'"),
])
def test_bad_flags_exit_2_with_one_line(argv, world_size, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_defaults_are_valid_and_plain():
    args = config.parse_args([])
    assert args.run_name == "fastnet-cifar10-seed0"
    plain = config.to_dict(args)
    assert plain["batch_size"] == 2000 and plain["optimizer"] == "muon" and all(isinstance(k, str) for k in plain)


def test_bad_flag_exits_before_any_process_group(tmp_path):
    # torchrun's variables point at a rendezvous nobody serves: parsing must fail before init.
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_module(["ddp.train", "--batch-size", "3"], cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [(
        "python -m ddp.train: error: --batch-size 3 does not split evenly across 2 processes; "
        "use a multiple of 2 (see --help)")]
