"""The package as a user gets it: requirements that say what runs and what tests, `pip install .` into a fresh
virtual environment, the entry points run from another directory, and old torch refused in one line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

from conftest import REPO

TEST_ONLY = {"pytest", "ruff", "hypothesis", "lightning", "timm", "huggingface_hub", "accelerate", "onnx", "h5py"}


def _requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments, blanks and -r includes left out)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def test_runtime_and_test_requirements_are_apart_and_agree_with_pyproject():
    runtime = _requirements(REPO / "requirements.txt")
    test = _requirements(REPO / "requirements-test.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {_name(r) for r in runtime} == {"torch", "torchvision", "numpy", "tensorboard", "tqdm", "safetensors"}
    assert not {_name(r) for r in runtime} & TEST_ONLY
    assert "-r requirements.txt" in (REPO / "requirements-test.txt").read_text().splitlines()
    assert sorted(test) == sorted(project["optional-dependencies"]["test"])  # one list, written twice
    assert {_name(r) for r in test} == TEST_ONLY
    assert re.search(r"pip install (-q )?-r requirements-test.txt", (REPO / ".ci" / "run").read_text())


def test_entry_points_import_nothing_the_tests_add():
    code = ("import sys, ddp.train, ddp.evaluate, ddp.checkpoint.__main__; "
            f"print(sorted(set({sorted(TEST_ONLY)!r}) & {{m.split('.')[0] for m in sys.modules}}))")
    result = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_installed_package_trains_and_inspects_from_another_directory(tmp_path):
    # a copy of what the package is built from, so the build writes nothing into the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ["pyproject.toml", "requirements.txt", "requirements-test.txt", "README.md"]:
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "ddp", source / "ddp", ignore=shutil.ignore_patterns("__pycache__"))
    # torch and the rest come from the system's site-packages (nothing downloaded); pip and setuptools too
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "--quiet", str(source)],
                             check=False, capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), *args], check=False, cwd=work, capture_output=True, text=True, env=env,
                              timeout=300)

    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    where = run("-c", "import ddp; print(ddp.__file__)")
    assert where.stdout.strip() == str(site / "ddp" / "__init__.py"), where.stderr
    packages = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "ddp").rglob("__init__.py"))
    assert [p for p in packages if not (site / p / "__init__.py").is_file()] == []  # every subpackage installed
    train = run("-m", "ddp.train", "--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "256",
                "--batch-size", "128", "--epochs", "1", "--tta", "none", "--checkpoint-dir", "ckpt", "--logdir", "runs")
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "epoch 1/1" in train.stdout and (work / "ckpt" / "latest.pt").is_file()
    inspect = run("-m", "ddp.checkpoint", "inspect", "ckpt/latest.pt")
    assert inspect.returncode == 0, inspect.stderr
    assert "fastnet_small" in inspect.stdout and "ddp-cifar/1" in inspect.stdout


def test_old_torch_is_refused_in_one_line(tmp_path):
    """Each entry point, run as `python -m`, under a torch that says it is 2.4.1: one line, exit status 2."""
    for module, args in [("ddp.train", ["--dataset", "synthetic"]), ("ddp.evaluate", ["--checkpoint", "x.pt"]),
                         ("ddp.checkpoint", ["inspect", "x.pt"])]:
        code = ("import runpy, sys, torch; torch.__version__ = '2.4.1+cu121'; "
                f"sys.argv = [{module!r}, *{args!r}]; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert result.returncode == 2, (module, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (module, result.stderr)
        assert "needs torch>=2.5" in lines[0] and "has torch 2.4.1+cu121" in lines[0], lines[0]
    assert not list(tmp_path.iterdir())  # refused before anything was written
