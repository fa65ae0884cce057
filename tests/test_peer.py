"""benchmarks.peer's machinery without a peer: the run-time move to the CPU, the progress protocol, the headline rows.

The peers themselves (their checkouts) are not part of the tests; `python -m benchmarks.peer --quick` runs them.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import peer_cpu
from benchmarks.peer import load_results, versus


def test_on_cpu_creates_on_the_cpu_what_peer_code_asks_cuda_for(tmp_path):
    torch.save({"images": torch.arange(6)}, tmp_path / "train.pt")
    load = torch.load
    with peer_cpu.on_cpu():
        made = [torch.empty(4, device="cuda"), torch.zeros(2, device=torch.device("cuda", 0)),
                torch.randperm(5, device="cuda")]
        loaded = torch.load(tmp_path / "train.pt", map_location=torch.device("cuda"), weights_only=True)
        pinned = made[0].pin_memory()
    assert all(t.device.type == "cpu" for t in [*made, loaded["images"]]) and pinned is made[0]
    assert torch.equal(loaded["images"], torch.arange(6)) and torch.load is load  # restored on the way out


def test_reporting_prints_the_protocol_lines_from_a_peers_own_log_variables(capsys):
    printed = []
    report = peer_cpu.reporting(lambda variables, is_final_entry: printed.append(variables["epoch"]))
    report({"epoch": 1, "val_acc": 0.5, "time_seconds": 3.0}, is_final_entry=False)
    report({"epoch": None, "val_acc": None}, is_final_entry=False)  # airbench's warm-up row: no line
    peer_cpu.TRAINED_IMAGES[0] = 4096
    report({"epoch": "eval", "tta_val_acc": 0.75, "total_time_seconds": 9.5}, is_final_entry=True)
    lines = capsys.readouterr().out.splitlines()
    assert printed == [1, None, "eval"]  # the peer's own table is still printed
    assert [line.split(" ", 1)[0] for line in lines] == [peer_cpu.EPOCH, peer_cpu.TRAINED]
    assert json.loads(lines[0].split(" ", 1)[1]) == {"epoch": 1, "acc": 0.5, "train_s": 3.0}
    assert json.loads(lines[1].split(" ", 1)[1]) == {"acc": 0.75, "train_s": 9.5, "images": 4096}


def test_headline_rows_time_to_the_peers_accuracy_and_accuracy_at_its_wall_time():
    ours = [{"curve": [[60, 0.80], [120, 0.90], [180, 0.93]], "wall_s": 185},
            {"curve": [[70, 0.85], [140, 0.92], [190, 0.94]], "wall_s": 195}]
    peer = [{"reported": 0.91, "wall_s": 200}, {"reported": 0.91, "wall_s": 300}]
    reach, at_wall, wall = versus(ours, "hiverge", peer, target=0.9)
    assert reach.ratio == pytest.approx((180 + 140) / 2 / 250) and reach.met  # 0.64x <= 0.9x
    assert at_wall.ratio == pytest.approx((0.93 + 0.94) / 2 / 0.91) and at_wall.met
    assert wall.ratio == pytest.approx(190 / 250)
    slow = versus([{"curve": [[60, 0.5]], "wall_s": 60}], "airbench94", peer, target=0.7)[0]
    assert slow.met is False and "not reached (1/1 seeds)" in slow.ours


def test_results_of_another_cpu_are_not_mixed_in(tmp_path):
    fresh = {"machine": {"cpu": "CPU A"}, "quick": True, "ours_extra": [], "runs": []}
    assert load_results(tmp_path / "results.json", fresh) is fresh
    (tmp_path / "results.json").write_text(json.dumps({**fresh, "runs": [{"side": "ours", "seed": 0}]}))
    assert load_results(tmp_path / "results.json", fresh)["runs"] == [{"side": "ours", "seed": 0}]
    with pytest.raises(SystemExit, match="measured otherwise"):
        load_results(tmp_path / "results.json", {**fresh, "machine": {"cpu": "CPU B"}})
