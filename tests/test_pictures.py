"""The README's pictures: the scripts that take them, the PNGs they made, and our side of the peer plot."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time

import pytest
import torch

from conftest import REPO, run_module

SCRIPTS = ["benchmarks/readme_pictures.sh", "benchmarks/tensorboard_screenshot.sh"]
# what benchmarks/readme_pictures.sh writes (the README shows both), and the window each is taken in
PICTURES = {"benchmarks/tensorboard.png": ("benchmarks/tensorboard_screenshot.sh", "WINDOW", (1400, 1000)),
            "benchmarks/tensorboard_hparams.png": ("benchmarks/readme_pictures.sh", "HPARAMS_WINDOW", (2100, 420))}
MAX_AGE_DAYS = 365  # pictures of today's recipe: retake them when it changes


def test_picture_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    result = subprocess.run(["shellcheck", *SCRIPTS], check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", PICTURES)
def test_readme_pictures_exist_as_recent_pngs_of_the_window_size(name):
    path = REPO / name
    script, variable, (width, height) = PICTURES[name]
    assert f"]({name})" in (REPO / "README.md").read_text(), f"README does not show {name}"
    assert f'{variable}="${{{variable}:-{width},{height}}}"' in (REPO / script).read_text()  # the size taken at
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{name} is not a PNG"
    assert struct.unpack(">II", header[16:24]) == (width, height)
    # git checkouts reset mtimes, so "recent" is the commit that last changed the picture
    committed = subprocess.run(["git", "log", "-1", "--format=%ct", "--", name], cwd=REPO, capture_output=True,
                               text=True, check=False).stdout.strip()
    taken = int(committed) if committed else path.stat().st_mtime
    assert time.time() - taken < MAX_AGE_DAYS * 86400, f"{name} is older than {MAX_AGE_DAYS} days: retake it"


def test_untimed_epoch_curve_scores_each_epoch_file_at_its_epoch_end(tmp_path):
    from benchmarks.common import untimed_epoch_curve

    run_dir = tmp_path / "runs" / "r"
    launch = time.time()
    result = run_module(["ddp.train", "--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "256",
                         "--batch-size", "128", "--epochs", "3", "--tta", "none", "--keep", "0", "--resume", "none",
                         "--logdir", str(run_dir.parent), "--run-name", "r", "--checkpoint-dir",
                         str(run_dir / "checkpoints")], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    end = time.time()

    def epoch_of(path: str) -> float:  # stands in for an evaluation: which epoch's weights the file holds
        return torch.load(path, map_location="cpu", weights_only=True)["progress"]["epoch"]

    curve = untimed_epoch_curve(run_dir, launch, epoch_of)
    assert [score for _, score in curve] == [1, 2, 3]
    times = [t for t, _ in curve]
    assert 0 < times[0] < times[1] < times[2] < end - launch
    (run_dir / "checkpoints" / "epoch_0002.pt").unlink()  # pruned (--keep 3, the default): no curve, no guess
    assert untimed_epoch_curve(run_dir, launch, epoch_of) == []
