"""No file can hurt (issue 17): every hand-made hostile case through every entry point, each in a watched child.

The outcome must be a load or a one-line refusal from a CheckpointError subclass: no signal, hang, memory
beyond max(64 MiB, 16 x the file size) above an import-only baseline, traceback, second stderr line,
control character, secret from outside the path, import outside the fixed set, socket, exec or written
file (tests/sandbox_run.py says how each is watched). All cases run once, two children at a time; each
test then reads its case's outcomes. ddp.evaluate (about 1.5 s a run: a process group, a data set) runs
on the cases whose harm it reaches in its own way; the other entry points on every case.

    HOSTILE_OUTCOMES=out.jsonl python -m pytest tests/test_hostile.py    # also writes every outcome
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

import craft
import hostile
from sandbox_run import API, Job, Outcome, Sandbox

CLI = ["inspect", "inspect_model", "convert", "export"]
EVALUATE = {"model_name_in_ours", "model_name_in_weights_export", "model_name_in_safetensors",
            "model_name_stdlib_module", "export_num_classes_huge", "safetensors_unknown_dataset",
            "safetensors_num_classes_not_json", "numpy_forged_dtype_allowlist", "escape_in_safetensors_metadata",
            "symlinked_safetensors"}


def entries(case: hostile.Case) -> list[str]:
    return API + CLI + (["evaluate"] if case.name in EVALUATE else [])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Sandbox, list[Outcome]]:
    root = tmp_path_factory.mktemp("sandbox")
    box = Sandbox(root, timeout=10.0)
    benign = box.warm_up(list(craft.real_checkpoints(root / "benign").values()))
    return box, benign


@pytest.fixture(scope="module")
def outcomes(sandbox, request) -> dict[str, list[Outcome]]:
    """The outcomes of the cases this session runs (all of them, unless -k picked some), by case name."""
    box, _ = sandbox
    chosen = {item.callspec.params["name"] for item in request.session.items
              if hasattr(item, "callspec") and "name" in item.callspec.params}
    jobs = []
    for case in hostile.CASES:
        if case.name not in chosen:
            continue
        directory = box.root / "cases" / case.name
        path = case.write(directory)
        jobs += [Job(case.name, entry, path, directory, secret=hostile.SECRET if case.secret else "", fill=case.fill,
                     extra_path=str(path.parent) if case.beside else None) for entry in entries(case)]
    found: dict[str, list[Outcome]] = {}
    for outcome in box.run(jobs):
        found.setdefault(outcome.case, []).append(outcome)
    if os.environ.get("HOSTILE_OUTCOMES"):  # a JSON line per run, for a table of what fails and how
        with open(os.environ["HOSTILE_OUTCOMES"], "w") as f:
            f.writelines(json.dumps({"cls": hostile.by_name()[o.case].cls, **asdict(o)}) + "\n"
                         for runs in found.values() for o in runs)
    return found


def test_real_checkpoints_of_every_layout_run_clean(sandbox) -> None:
    """The watch itself raises no false alarm: real files load or are refused in one line, and most load."""
    _, benign = sandbox
    bad = [f"{o.entry}: {o.finding} {o.detail}" for o in benign if not o.ok]
    assert not bad, "\n".join(bad)
    assert sum(o.outcome == "loaded" for o in benign) >= len(benign) // 2


def test_every_class_of_the_issue_has_cases() -> None:
    classes = {c.cls for c in hostile.CASES}
    assert classes == {"memory corruption", "code execution", "resource exhaustion", "hang", "outside the path",
                       "terminal escapes", "traceback"}
    assert len(hostile.CASES) == len(hostile.by_name()), "case names must be unique"


@pytest.mark.parametrize("name", [c.name for c in hostile.CASES])
def test_hostile_case_loads_or_is_refused_in_one_line(name: str, outcomes: dict[str, list[Outcome]]) -> None:
    got = outcomes[name]
    assert {o.entry for o in got} == set(entries(hostile.by_name()[name]))
    bad = [f"{o.entry}: {o.finding}: {o.detail} (peak {o.peak_mib} MiB, {o.seconds} s)" for o in got if not o.ok]
    assert not bad, f"{name} ({hostile.by_name()[name].cls}):\n" + "\n".join(bad)

