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



def _touch_memory(_: str) -> None:
    block = bytearray(512 << 20)
    block[::4096] = b"\x01" * len(block[::4096])  # resident, page by page


MISDEEDS = {  # what a reader might do -> the finding the watch must report
    "segfault": (lambda _: os.kill(os.getpid(), 11), "signal"),
    "hang": (lambda _: __import__("time").sleep(60), "timeout"),
    "memory": (_touch_memory, "memory"),
    "socket": (lambda _: __import__("socket").socket().close(), "socket"),
    "write": (lambda p: open(os.path.join(os.path.dirname(p), "dropped"), "w").close(), "write"),
    "temp_dir": (lambda _: __import__("tempfile").mkdtemp(), "write"),
    "subprocess": (lambda _: __import__("subprocess").run(["true"], check=False), "exec"),
    "import": (lambda _: __import__("importlib").import_module("tabnanny"), "import"),
    "read_outside": (lambda p: open(os.path.join(os.path.dirname(os.path.dirname(p)), "secret.txt")).close(),
                     "outside"),
    "escape": (lambda _: print("\x1b[2Jfake"), "control"),
    "warning": (lambda _: __import__("warnings").warn("careful", UserWarning, stacklevel=1), "stderr"),
    "other_error": (lambda _: {}["missing"], "traceback"),
    # a CheckpointError's message is one line by construction (newlines escaped), so a second line must be printed
    "two_line_error": (lambda _: (print("noise", file=__import__("sys").stderr),
                                  (_ for _ in ()).throw(__import__("ddp").checkpoint.CheckpointError("a\nb"))),
                       "stderr"),
    "alloc_error": (lambda _: bytearray(1 << 62), "memory"),
    "not_found_inside": (lambda p: open(p + ".missing-shard").close(), "traceback"),  # the path given exists
}


def test_the_watch_reports_every_kind_of_misdeed(sandbox, tmp_path) -> None:
    """The sandbox is what makes the hostile tests able to fail: each misdeed, done by a stand-in reader in
    a child, is reported as the finding it is; a clean stand-in is a load."""
    import sandbox_run

    box, _ = sandbox
    (tmp_path / "case" / "ckpt").mkdir(parents=True)
    (tmp_path / "case" / "secret.txt").write_text("not yours")
    path = tmp_path / "case" / "ckpt" / "file.pt"
    path.write_bytes(b"x")
    sandbox_run.CUSTOM.update({f"misdeed_{k}": f for k, (f, _) in MISDEEDS.items()}, clean=lambda _: None)
    timeout, box.timeout = box.timeout, 3.0
    try:
        got = box.run([Job("watch", e, path, tmp_path / "case") for e in [*sandbox_run.CUSTOM]],
                      skip_after_timeout=False)
    finally:
        box.timeout = timeout
    found = {o.entry: o for o in got}
    assert found["clean"].outcome == "loaded", found["clean"]
    wrong = {k: (found[f"misdeed_{k}"].finding, found[f"misdeed_{k}"].detail) for k, (_, want) in MISDEEDS.items()
             if found[f"misdeed_{k}"].finding != want}
    assert not wrong, wrong
