"""Every command in README.md and docs/*.md names a module that imports and only flags that exist.

Commands come from fenced code blocks (not ```python ones; in a block with `$ ` prompts, only the
prompted lines): `python -m X`, `torchrun ... -m X` or `torchrun ... script.py`, and the scripts in
`launch/` (`launch/*.sh`, `sbatch launch/slurm/*.sbatch`), whose arguments go to ddp.train. Each program's
`--help` runs once, a few at a time; torchrun's own flags are checked against `torch.distributed.run`'s.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO

TRAIN = ("ddp.train",)
TORCHRUN = ("torch.distributed.run",)
SUBCOMMANDS = {"ddp.checkpoint"}  # `python -m ddp.checkpoint SUB ...`: the flags are SUB's
PASSTHROUGH = {"benchmarks.peer": TRAIN, "benchmarks.time_to_accuracy": TRAIN}  # flags after `--` go to ddp.train
NOT_OURS = {"pip", "pytest"}  # python -m modules whose flags are not ours to check
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
CANDIDATE = re.compile(r"(?:[A-Za-z_]\w*=\S*\s+)*(?:python3?\s|torchrun\s|sbatch\s|(?:\./)?launch/)")
LAUNCH_SCRIPT = re.compile(r"(?:\./)?launch/\S+\.(?:sh|sbatch)")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


@dataclass
class Command:
    """One documented command line and what it asks of each program it runs."""

    where: str  # "docs/training.md:42"
    text: str
    calls: list[tuple[tuple[str, ...], list[str]]] = field(default_factory=list)  # (program, its --flags)
    scripts: list[str] = field(default_factory=list)  # launch/ files it runs, relative to the repo
    error: str | None = None  # the line does not parse as a shell command


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, command line) of every fenced shell block: continuations joined, prompts removed."""
    out, block, lang, start = [], None, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("```"):
            if block is None:
                block, lang, start = [], line[3:].strip(), number
                continue
            if lang in SHELL_BLOCKS:
                out += _commands_of_block(block, start)
            block = None
        elif block is not None:
            block.append(line)
    return out


def _commands_of_block(lines: list[str], start: int) -> list[tuple[int, str]]:
    joined: list[tuple[int, str]] = []
    for offset, line in enumerate(lines, start + 1):
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
        else:
            joined.append((offset, line))
    if any(line.startswith("$ ") for _, line in joined):  # a transcript: the rest is output
        return [(n, line[2:]) for n, line in joined if line.startswith("$ ")]
    return joined


def tokens(line: str) -> list[str]:
    """The words of a shell command up to its first operator (pipe, `;`, `&&`, redirection); comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    ends = [i for i, w in enumerate(words) if w and set(w) <= set("();<>|&")]
    return words[: ends[0]] if ends else words


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


def parse(where: str, line: str) -> Command | None:
    """The programs a command line runs and the flags it gives each; None for lines we do not check."""
    if not CANDIDATE.match(line.strip()):
        return None
    command = Command(where, line.strip())
    try:
        words = tokens(line)
    except ValueError as e:
        command.error = str(e)
        return command
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    program, rest = words[0], words[1:]
    if program == "sbatch" or LAUNCH_SCRIPT.fullmatch(program):
        at = next((i for i, w in enumerate(words) if LAUNCH_SCRIPT.fullmatch(w)), None)
        if at is None:
            return None  # sbatch of something else
        command.scripts.append(words[at])
        command.calls.append((TRAIN, flags(words[at + 1:])))
        return command
    if program == "torchrun":
        at = next((i for i, w in enumerate(rest) if w == "-m" or w.endswith(".py")), len(rest))
        command.calls.append((TORCHRUN, flags(rest[:at])))
        rest = rest[at:]
    elif not program.startswith("python"):
        return None
    if rest[:1] == ["-m"] and len(rest) > 1:
        module, rest = rest[1], rest[2:]
        if module.split(".")[0] in NOT_OURS:
            return None
        key: tuple[str, ...] = (module,)
        if module in SUBCOMMANDS and rest and not rest[0].startswith("-"):
            key, rest = (module, rest[0]), rest[1:]
    elif rest and rest[0].endswith(".py"):
        key, rest = ("script", rest[0]), rest[1:]
    else:
        return None if not command.calls else command
    if key[0] in PASSTHROUGH and "--" in rest:
        command.calls.append((PASSTHROUGH[key[0]], flags(rest[rest.index("--") + 1:])))
        rest = rest[: rest.index("--")]
    command.calls.append((key, flags(rest)))
    return command


def documented_commands(paths: list[Path]) -> list[Command]:
    commands = []
    for path in paths:
        for number, line in shell_lines(path.read_text()):
            command = parse(f"{path.relative_to(REPO)}:{number}", line)
            if command:
                commands.append(command)
    return commands


def help_text(program: tuple[str, ...]) -> tuple[int, str]:
    """(exit status, output) of the program's --help, run from the repository with it importable."""
    argv = [sys.executable, program[1]] if program[0] == "script" else [sys.executable, "-m", *program]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*argv, "--help"], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def options(help_output: str) -> set[str]:
    """The option strings argparse lists in a --help (`  -h, --help`, `  --lr LR  help...`)."""
    found = set()
    for line in help_output.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("-") and len(line) - len(stripped) <= 6:
            found.update(OPTION.findall(re.split(r"\s{2,}", stripped)[0]))
    return found


def problems(commands: list[Command], helps: dict[tuple[str, ...], tuple[int, str]]) -> list[str]:
    """One line per documented command that names a missing script, a module that fails, or an unknown flag."""
    out = []
    for c in commands:
        if c.error:
            out.append(f"{c.where}: `{c.text}`: does not parse ({c.error})")
        for script in c.scripts:
            if not (REPO / script).is_file():
                out.append(f"{c.where}: `{c.text}`: runs {script}, which does not exist")
        for program, used in c.calls:
            status, text = helps[program]
            name = " ".join(program)
            if status != 0:
                out.append(f"{c.where}: `{c.text}`: `{name} --help` exited {status}: {text.strip()[-300:]}")
                continue
            known = options(text)
            out += [f"{c.where}: `{c.text}`: {name} has no flag {flag}" for flag in used if flag not in known]
    return out


@pytest.fixture(scope="module")
def commands() -> list[Command]:
    return documented_commands([REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


@pytest.fixture(scope="module")
def helps(commands) -> dict[tuple[str, ...], tuple[int, str]]:
    programs = sorted({program for c in commands for program, _ in c.calls} | {TRAIN})
    with ThreadPoolExecutor(max_workers=4) as pool:  # each imports torch: a few seconds of CPU
        return dict(zip(programs, pool.map(help_text, programs)))


def test_every_documented_command_runs_a_module_that_imports_with_flags_that_exist(commands, helps):
    programs = {program for c in commands for program, _ in c.calls}
    assert {TRAIN, TORCHRUN, ("ddp.evaluate",), ("ddp.checkpoint", "inspect")} <= programs, programs
    assert len(commands) >= 30, [c.text for c in commands]  # the extractor found the docs' commands
    found = problems(commands, helps)
    assert not found, "commands in the docs that would fail:\n" + "\n".join(found)


BAD_SAMPLE = """
```bash
torchrun --standalone --nproc_per_node=2 --no-such-torchrun-flag -m ddp.train --epochs 3 \\
    --lr=0.1 --no-such-flag 1   # --commented-out-flag
NPROC=4 launch/torchrun.sh --data-dir data --bogus
sbatch --gres=none launch/slurm/train_multinode.sbatch --epochs 2 | tail -2
python -m benchmarks.time_to_accuracy --name e7 -- --epochs 7 --not-a-train-flag
python3 -m ddp.checkpoint inspect "epoch=0-step=1.ckpt" --model
launch/missing.sh --epochs 1
python -m pip install -r requirements.txt
tensorboard --logdir runs
```

```
$ python -m ddp.evaluate --checkpoint best.pt
python -m ddp.train: error: --not-a-command (output, not a command)
```

```python
python -m ddp.train --ignored-in-python-blocks
```
"""


def test_the_check_names_file_command_and_flag_of_a_bad_sample(helps):
    """A flag that does not exist fails the check: the extractor and the option parsing on a known-bad sample."""
    commands = [parse(f"docs/bad_sample.md:{n}", line) for n, line in shell_lines(BAD_SAMPLE)]
    commands = [c for c in commands if c]
    assert [(c.calls, c.scripts) for c in commands] == [
        ([(TORCHRUN, ["--standalone", "--nproc_per_node", "--no-such-torchrun-flag"]),
          (TRAIN, ["--epochs", "--lr", "--no-such-flag"])], []),
        ([(TRAIN, ["--data-dir", "--bogus"])], ["launch/torchrun.sh"]),
        ([(TRAIN, ["--epochs"])], ["launch/slurm/train_multinode.sbatch"]),
        ([(TRAIN, ["--epochs", "--not-a-train-flag"]), (("benchmarks.time_to_accuracy",), ["--name"])], []),
        ([(("ddp.checkpoint", "inspect"), ["--model"])], []),
        ([(TRAIN, ["--epochs"])], ["launch/missing.sh"]),
        ([(("ddp.evaluate",), ["--checkpoint"])], []),
    ]
    fake_help = (0, "usage: x [-h] [--name NAME]\n\noptions:\n  -h, --help   show this help\n  --name NAME  run name\n")
    inspect_help = (0, "options:\n  --model [NAME]  diff the keys\n")
    found = problems(commands, {**helps, ("benchmarks.time_to_accuracy",): fake_help,
                                ("ddp.checkpoint", "inspect"): inspect_help, ("ddp.evaluate",): (1, "ImportError: boom")})
    assert [(m.split(": `")[0], m.rsplit("`: ", 1)[1]) for m in found] == [
        ("docs/bad_sample.md:3", "torch.distributed.run has no flag --no-such-torchrun-flag"),
        ("docs/bad_sample.md:3", "ddp.train has no flag --no-such-flag"),
        ("docs/bad_sample.md:5", "ddp.train has no flag --bogus"),
        ("docs/bad_sample.md:7", "ddp.train has no flag --not-a-train-flag"),
        ("docs/bad_sample.md:9", "runs launch/missing.sh, which does not exist"),
        ("docs/bad_sample.md:15", "`ddp.evaluate --help` exited 1: ImportError: boom"),
    ]
    assert "`NPROC=4 launch/torchrun.sh --data-dir data --bogus`" in found[2]  # the whole command, as written
