from __future__ import annotations

import pytest

from conftest import run_module
from ddp import config


@pytest.mark.parametrize("argv, world_size, message", [
    (["--epochs", "-1"], 1, "argument --epochs: must be a positive number, such as 8 or 7.5; got '-1'"),
    (["--epochs", "inf"], 1, "argument --epochs: must be a positive number, such as 8 or 7.5; got 'inf'"),
    (["--model", "vgg"], 1, "unknown model 'vgg'; one of: fastnet"),
    (["--model", "torchvision:nope"], 1, "'nope' is not a torchvision classification model"),
    (["--run-name", "{nope}"], 1, "--run-name '{nope}' is not a valid template"),
    (["--batch-size", "2"], 4, "--batch-size 2 is smaller than the 4 processes"),
    (["--batch-size", "510"], 4, "does not split evenly across 4 processes; use a multiple of 4"),
    (["--dataset", "synthetic", "--synthetic-size", "100"], 1, "larger than the 100 training images"),
    (["--lr", "0"], 1, "--lr must be positive"),
    (["--seed", str(2**64)], 1, "--seed must fit in 64 bits, got 18446744073709551616"),
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
    assert (args.model, args.dataset, args.run_name) == (None, None, None)  # until a resumed checkpoint is known
    config.resolve(args, None)
    assert (args.model, args.dataset, args.run_name) == ("fastnet", "cifar10", "fastnet-cifar10-seed0")


def test_left_out_model_dataset_and_run_name_come_from_the_resumed_checkpoint():
    recorded = {"model": "torchvision:resnet18", "dataset": "cifar100", "run_name": "first-v2"}
    args = config.parse_args(["--seed", "3"])
    config.resolve(args, recorded)
    assert (args.model, args.dataset, args.run_name) == ("torchvision:resnet18", "cifar100", "first-v2")
    args = config.parse_args(["--model", "resnet18", "--run-name", "{model}-{seed}"])  # a given model wins, but
    config.resolve(args, recorded)  # the resumed run keeps writing to its own TensorBoard run
    assert (args.model, args.dataset, args.run_name) == ("resnet18", "cifar100", "first-v2")
    args = config.parse_args(["--model", "resnet18", "--run-name", "{model}-{seed}"])
    config.resolve(args, None)
    assert args.run_name == "resnet18-0"
    args = config.parse_args(["--model", "torchvision:vgg11"])
    config.resolve(args, None)
    assert args.run_name == "torchvision_vgg11-cifar10-seed0"
    plain = config.to_dict(args)
    assert plain["batch_size"] == 1536 and plain["optimizer"] == "muon" and all(isinstance(k, str) for k in plain)


def test_left_out_recipe_flags_come_from_the_resumed_checkpoint_and_given_ones_win():
    """A run started under older defaults resumes with its own recipe, not today's."""
    old = {"epochs": 8, "batch_size": 2000, "label_smoothing": 0.2, "whiten_bias_epochs": 3, "lookahead": True,
           "amp": "none", "tta": "full"}
    args = config.parse_args(["--label-smoothing", "0.1"])
    config.resolve(args, old)
    assert (args.epochs, args.batch_size, args.whiten_bias_epochs, args.lookahead, args.amp) == (8, 2000, 3, True, "none")
    assert args.label_smoothing == 0.1 and args.tta == "unsure"  # given on the command line; not a recipe flag
    assert "given" not in config.to_dict(args)  # nothing of the bookkeeping reaches checkpoints or TensorBoard

    # A crafted config: values of the wrong kind are ignored (the flag's own value stays) ...
    args = config.parse_args([])
    config.resolve(args, {"lr": "1e9", "batch_size": 2.5, "epochs": float("nan"), "lookahead": 1, "seed": True})
    assert (args.lr, args.batch_size, args.epochs, args.lookahead, args.seed) == (1.03, 1536, 8.5, False, 0)
    # ... and values of the right kind that this code refuses are a one-line error that names the flag
    for recorded, message in [({"epochs": -3}, "--epochs must be positive"), ({"optimizer": "adam"}, "--optimizer"),
                              ({"batch_size": 10**9}, "--batch-size 1000000000 is larger than"),
                              ({"seed": 2**64}, "--seed must fit in 64 bits")]:
        with pytest.raises(config.CheckpointFormatError, match="recipe does not fit: " + message):
            config.resolve(config.parse_args([]), recorded)


def test_bad_flag_exits_before_any_process_group(tmp_path):
    # torchrun's variables point at a rendezvous nobody serves: parsing must fail before init.
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_module(["ddp.train", "--batch-size", "3"], cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [(
        "python -m ddp.train: error: --batch-size 3 does not split evenly across 2 processes; "
        "use a multiple of 2 (see --help)")]
