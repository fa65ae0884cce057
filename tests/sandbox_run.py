"""Run every checkpoint entry point on a path nobody vouched for, each run in a forked child that is watched.

torch and ddp are imported once, and every entry point is run once on real checkpoints of every layout
(`warm_up`), so lazy imports and one-time initialisation happen here. The modules imported by then are
the fixed set a hostile file may not add to. Then each (path, entry point) runs in a child forked from
this process, with:

    memory    peak RSS above the child's RSS at fork (its baseline: everything imported, nothing loaded),
              from wait4's ru_maxrss; the bound is max(FLOOR_MIB, K x size of the path). The parent also
              polls /proc/PID/status and kills the child above the bound plus slack, and RLIMIT_DATA caps
              the child's private memory at baseline + 2 GiB, so no file can take the machine down.
              An exception caused by a failed allocation (MemoryError, torch's "can't allocate memory")
              is a memory finding too, even when wrapped in a CheckpointError: bounds are to be checked
              before allocating, not learnt from the allocator.
    time      killed after `timeout` seconds.
    cwd etc.  a fresh empty cwd, HOME and TMPDIR inside the run's own directory; convert/export write
              into the run's out/ directory, the only place a run may write.
    audit     sys.addaudithook, active only in children: imports of modules outside the fixed set (and
              sys.modules compared with that set at the end: importlib.import_module raises no event),
              socket.*, os.system/exec/spawn/subprocess.Popen, opens for writing and mkdir/rename/remove
              outside out/, and opens for reading under the case's directory but outside the given path
              (the given directory, or the given file's directory). Events go to a pipe, unbuffered,
              so a child that dies afterwards still reported them.
    files     the case's directory and the run's cwd/home/tmp are listed before and after: any new file
              (written by C code, which raises no audit event) is a finding.

An outcome is "loaded" (the call returned / exit 0 with nothing on stderr), "refused" (a CheckpointError
subclass / exit 2 with exactly one non-empty line on stderr, no "Traceback", no "Warning"), or a finding:
signal, timeout, memory, traceback (any other exception, or a CLI exit other than 0 and 2), stderr
(warnings or several lines), control (ESC or other control characters in what we print), outside (a
secret planted outside the given path came back), values (a loaded tensor is not what the file holds:
unvalidated sparse, meta, uninitialised), import, socket, exec, write.

    python tests/sandbox_run.py PATH [ENTRY ...]    one path, printed as JSON lines
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")  # a forked child must not wait on the parent's thread pool
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]

import torch

from ddp import checkpoint, models, resume
from ddp.checkpoint import __main__ as cli
from ddp.dist import Context

torch.set_num_threads(1)  # where torch was imported before us: one thread, no pool a fork would inherit locked

K = 16  # peak RSS may grow by K x the file size ...
FLOOR_MIB = 64  # ... or by this much, whichever is more
API = ["load_weights", "load_model_state", "load_into", "init_from", "resume"]
CLI = ["inspect", "inspect_model", "convert", "export", "evaluate"]
ENTRIES = API + CLI
CUSTOM: dict[str, Any] = {}  # name -> function(path): more entry points, run as the API ones (the watch's own tests)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what a terminal may act on; \t and \n are fine
ALLOC_FAILED = re.compile(r"can't allocate memory|not enough memory|out of memory|MemoryError|DefaultCPUAllocator",
                          re.IGNORECASE)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Modules a refusal may import although no load of a real checkpoint does (an error path's lazy import):
# name them here, with why. Anything else imported in a child is a finding.
LAZY_MODULES: frozenset[str] = frozenset()
CPU = Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


@dataclass
class Outcome:
    case: str
    entry: str
    outcome: str  # "loaded", "refused" or "finding"
    finding: str = ""  # the kind of finding: signal, timeout, memory, traceback, stderr, control, ...
    detail: str = ""  # the error's first line, the signal, the event
    peak_mib: float = 0.0  # peak RSS above the child's baseline
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("loaded", "refused")

    @property
    def signature(self) -> str:
        """What kind of outcome this is, for counting distinct ones: entry, outcome, error class."""
        head = re.split(r"[:(]", self.detail, maxsplit=1)[0].strip()[:60] if self.outcome != "loaded" else ""
        return f"{self.entry}|{self.outcome}|{self.finding}|{head}"


# ----------------------------------------------------------------------------- the child's side

_audit: dict[str, Any] = {"fd": None}  # set in a child only: the pipe and what it may touch


def _report(kind: str, detail: str) -> None:
    fd = _audit["fd"]
    if fd is not None and _audit["count"] < 200:
        _audit["count"] += 1
        os.write(fd, (json.dumps({"event": kind, "detail": detail[:300]}) + "\n").encode())


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _hook(event: str, args: tuple) -> None:
    if _audit["fd"] is None:
        return
    try:
        if event == "import":
            if args[0] not in _audit["modules"]:
                _report("import", str(args[0]))
        elif event.startswith("socket."):
            _report("socket", event)
        elif event in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                       "os.forkpty", "pty.spawn", "ctypes.dlopen", "os.kill"):
            _report("exec", f"{event} {str(args[:2])[:200]}")
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.path.realpath(os.fsdecode(args[0])), args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if writes and not _inside(path, _audit["writable"]):
                _report("write", f"open {path} {mode or oct(flags)}")
            elif not writes and _inside(path, (_audit["case_dir"],)) and not _inside(path, _audit["readable"]):
                _report("outside", f"read {path}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
                       "os.chmod", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"):
            path = os.path.realpath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            if not _inside(path, _audit["writable"]):
                _report("write", f"{event} {path}")
    except Exception as e:  # noqa: BLE001 -- the hook must never break the run it watches
        _report("hook", f"{event}: {e!r}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _plain_warnings() -> None:
    """Warnings as a fresh `python -m` shows them, on stderr: not recorded by pytest, none forgotten as shown."""
    warnings.resetwarnings()
    for category in (ImportWarning, ResourceWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = _show_warning
    warnings._showwarnmsg_impl = lambda m: _show_warning(m.message, m.category, m.filename, m.lineno, m.file, m.line)


def _status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmData", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _alloc_failed(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, MemoryError) or ALLOC_FAILED.search(f"{type(e).__name__}: {e}"):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _check_state(state: Any, fill: float | None) -> str:
    """Why a loaded state dict is not what a file can honestly hold, or ""."""
    if not isinstance(state, dict):
        return f"state is a {type(state).__name__}"
    for key, t in state.items():
        if not isinstance(key, str):
            return f"key {key!r} is a {type(key).__name__}"
        if not isinstance(t, torch.Tensor):
            return f"{key} is a {type(t).__name__}"
        if t.is_meta or t.device.type == "meta":
            return f"{key} is a meta tensor (no data)"
        if t.layout != torch.strided:
            try:
                torch._validate_sparse_coo_tensor_args(t._indices(), t._values(), t.shape)
            except Exception as e:  # noqa: BLE001
                return f"{key}: unvalidated sparse tensor ({str(e).splitlines()[0][:100]})"
            return f"{key} has layout {t.layout}"
        if fill is not None and t.numel() and not bool((t.double() == fill).all()):
            return f"{key} holds values the file never wrote (all should be {fill})"
    return ""


def _loaded_text(obj: Any) -> str:
    """What came back, as text to look for a planted secret in."""
    with contextlib.suppress(Exception):
        state = getattr(obj, "state", obj)
        return " ".join(map(str, state)) + " " + str(getattr(obj, "info", ""))
    return ""


def _run_api(entry: str, path: str, cwd: Path, fill: float | None) -> dict:
    result: Any = None
    if entry in CUSTOM:
        result = CUSTOM[entry](path)
    elif entry == "load_weights":
        result = checkpoint.load_weights(path)
    elif entry == "load_model_state":
        result = checkpoint.load_model_state(path)
    elif entry == "load_into":
        checkpoint.load_into(models.build("fastnet_small"), path)
    elif entry == "init_from":
        import argparse

        args = argparse.Namespace(init_from=path, checkpoint_key=None, remap=[], min_match=0.5)
        resume.init_from(args, models.build("fastnet_small"), CPU)
    elif entry == "resume":
        import argparse

        found = resume.find_resume_checkpoint(argparse.Namespace(resume=path, checkpoint_dir=str(cwd)), CPU)
        checkpoint.restore_checkpoint(found[1], models.build("fastnet_small"))
    state = getattr(result, "state", result)
    bad = _check_state(state, fill) if state is not None else ""
    return {"status": "values" if bad else "loaded", "detail": bad, "text": _loaded_text(result)}


def _cli_argv(entry: str, path: str, out: Path, data_dir: str) -> tuple[Any, list[str]]:
    if entry == "evaluate":
        from ddp import evaluate

        return evaluate.main, ["--checkpoint", path, "--device", "cpu", "--data-dir", data_dir, "--tta", "none",
                               "--amp", "none"]
    argv = {"inspect": ["inspect", path], "inspect_model": ["inspect", path, "--model"],
            "convert": ["convert", path, str(out / "converted.pt")],
            "export": ["export", path, str(out / "exported.pt")]}[entry]
    return cli.main, argv


def _run_entry(entry: str, path: str, cwd: Path, out: Path, data_dir: str, fill: float | None) -> dict:
    if entry in API or entry in CUSTOM:
        return _run_api(entry, path, cwd, fill)
    main, argv = _cli_argv(entry, path, out, data_dir)
    try:
        code = main(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return {"status": "exit", "code": code}


def _report_error(e: BaseException, path: str) -> dict:
    """A CheckpointError is a refusal; so is FileNotFoundError for a path that does not exist, and
    IsADirectoryError for a directory given that holds no checkpoint. Anything else: the traceback Python
    would print, and an error."""
    as_given = isinstance(e, FileNotFoundError) and not os.path.exists(path) or \
        isinstance(e, IsADirectoryError) and os.path.isdir(path)
    if isinstance(e, checkpoint.CheckpointError) or as_given:
        return {"status": "refused", "detail": f"{type(e).__name__}: {e}", "alloc": _alloc_failed(e),
                "multiline": "\n" in str(e).strip()}
    traceback.print_exception(e)
    return {"status": "error", "detail": f"{type(e).__name__}: {str(e).strip()[:300]}", "alloc": _alloc_failed(e)}


def _child(entry: str, path: str, run: Path, case_dir: str, data_dir: str, fill: float | None,
           extra_path: str | None, fd: int, modules: frozenset[str]) -> None:
    """In the forked child: confine, run one entry point, report, exit. Never returns."""
    code = 3
    try:
        os.setpgid(0, 0)
        cwd, home, tmp, out = (run / n for n in ("cwd", "home", "tmp", "out"))
        for d in (cwd, home, tmp, out):
            d.mkdir(parents=True)
        given = os.path.realpath(path)
        readable = (given,) if os.path.isdir(given) else (os.path.dirname(given),)
        out_fd, err_fd = os.open(run / "stdout", os.O_WRONLY | os.O_CREAT), os.open(run / "stderr", os.O_WRONLY | os.O_CREAT)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        # under pytest sys.stdout/stderr are capture objects, not the fds: write where a real run writes
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
        os.chdir(cwd)
        os.environ.update(HOME=str(home), TMPDIR=str(tmp))
        tempfile.tempdir = str(tmp)
        if extra_path:  # as if run from the directory that holds the file: `python -m` puts cwd on sys.path
            sys.path.insert(0, extra_path)
        faulthandler.disable()  # pytest's would print the crash into the test's output: the signal is reported
        sys.excepthook = sys.__excepthook__  # torch.distributed's prefixes "[rank0]: " once a group existed
        _plain_warnings()
        data = _status()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_DATA, (data["VmData"] + (2 << 30),) * 2)
        os.write(fd, (json.dumps({"start_rss": data["VmRSS"]}) + "\n").encode())
        _audit.update(fd=fd, count=0, modules=modules, writable=(os.path.realpath(out), "/dev/null"),
                      readable=readable, case_dir=os.path.realpath(case_dir))
        try:
            report = _run_entry(entry, path, cwd, out, data_dir, fill)
        except BaseException as e:  # noqa: BLE001 -- judged below
            report = _report_error(e, path)
        _audit["fd"] = None
        new = sorted(set(sys.modules) - modules)  # importlib.import_module raises no "import" audit event
        if new:
            os.write(fd, (json.dumps({"event": "import", "detail": ", ".join(new)[:300]}) + "\n").encode())
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(fd, (json.dumps(report) + "\n").encode())
        code = 0
    finally:
        os._exit(code)


# ----------------------------------------------------------------------------- the parent's side


def _files(dirs: list[Path]) -> set[str]:
    found = set()
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            found.update(os.path.join(root, n) for n in files + subdirs)
    return found


def path_size(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_dir():
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())
    return path.stat().st_size if path.is_file() else 0


@dataclass
class Job:
    case: str
    entry: str
    path: Path
    case_dir: Path
    secret: str = ""
    fill: float | None = None
    extra_path: str | None = None
    # set when it starts: its run directory, the case's files before, the memory bound, the pipe, the watch
    run: Path = field(default=Path())
    before: set[str] = field(default_factory=set)
    limit: int = 0
    read_fd: int = -1
    started: float = 0.0
    killed: str = ""  # "timeout" or "memory" once the parent killed it
    text: bytes = b""  # what came through the pipe
    peak: int = 0  # the highest RSS above its start seen by polling


def _messages(job: Job) -> list[dict]:
    """The complete JSON lines the child sent so far."""
    out = []
    for line in job.text.decode(errors="replace").split("\n")[:-1]:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


class Sandbox:
    """The warmed-up parent: `run(jobs)` forks a watched child per job, `jobs` at a time."""

    def __init__(self, root: Path, timeout: float = 8.0, parallel: int = 2):
        from conftest import write_cifar_dir

        self.root, self.timeout, self.parallel = Path(root), timeout, parallel
        self.data_dir = str(write_cifar_dir(self.root / "cifar", per_batch=4))
        write_cifar_dir(self.root / "cifar", per_batch=4, dataset="cifar100")
        self.modules = frozenset()
        self._runs = 0

    def warm_up(self, paths: list[Path]) -> list[Outcome]:
        """Run every entry point on each benign path here (the imports it makes count as the fixed set), then
        in children, as a check of the watch itself. ddp.evaluate (a process group, a data set: ~1.5 s) runs
        on the first path only."""
        import io

        out = self.root / "warm-out"
        for i, path in enumerate(paths):
            for entry in ENTRIES if i == 0 else ENTRIES[:-1]:
                sink = io.StringIO()
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                        warnings.catch_warnings(), contextlib.suppress(Exception, SystemExit):
                    warnings.simplefilter("ignore")
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    if entry in API:
                        _run_api(entry, str(path), out, None)
                    else:
                        main, argv = _cli_argv(entry, str(path), out, self.data_dir)
                        main(argv)
        self.modules = frozenset(sys.modules) | LAZY_MODULES
        sys.addaudithook(_hook)
        return self.run([Job("benign", e, p, p.parent) for i, p in enumerate(paths)
                         for e in (ENTRIES if i == 0 else ENTRIES[:-1])])

    def run(self, jobs: list[Job], skip_after_timeout: bool = True) -> list[Outcome]:
        """Every job's outcome. A case that timed out once has its other entry points skipped (each would
        most likely wait out the timeout too): they are reported as a "skipped" finding."""
        pending, running, done, timed_out = list(jobs), {}, [], set()
        while pending or running:
            while pending and len(running) < self.parallel:
                job = pending.pop(0)
                if job.case in timed_out:
                    done.append(Outcome(job.case, job.entry, "finding", "skipped", "another entry point timed out"))
                    continue
                running[self._start(job)] = job
            time.sleep(0.005)
            for pid, job in list(running.items()):
                outcome = self._poll(pid, job)
                if outcome is not None:
                    del running[pid]
                    done.append(outcome)
                    if outcome.finding == "timeout" and skip_after_timeout:
                        timed_out.add(job.case)
        return done

    def _start(self, job: Job) -> int:
        self._runs += 1
        job.run = self.root / "runs" / f"{self._runs:06d}"
        job.run.mkdir(parents=True)
        job.before = _files([job.case_dir])
        job.limit = max(FLOOR_MIB << 20, K * path_size(job.path))
        job.read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(job.read_fd)
            _child(job.entry, str(job.path), job.run, str(job.case_dir), self.data_dir, job.fill,
                   job.extra_path, write_fd, self.modules)
        os.close(write_fd)
        os.set_blocking(job.read_fd, False)
        job.started = time.monotonic()
        return pid

    def _drain(self, job: Job) -> None:
        while select.select([job.read_fd], [], [], 0)[0]:
            chunk = os.read(job.read_fd, 65536)
            if not chunk:
                break
            job.text += chunk

    def _poll(self, pid: int, job: Job) -> Outcome | None:
        self._drain(job)
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited == 0:
            start = next((x["start_rss"] for x in _messages(job) if "start_rss" in x), None)
            rss = _status(pid).get("VmRSS", 0)
            if start is not None:
                job.peak = max(job.peak, rss - start)
            if time.monotonic() - job.started > self.timeout:
                job.killed = "timeout"
            elif start is not None and rss - start > job.limit + (256 << 20):
                job.killed = "memory"
            if job.killed:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return None
        self._drain(job)
        os.close(job.read_fd)
        return self._classify(job, status, usage)

    def _classify(self, job: Job, status: int, usage: Any) -> Outcome:
        seconds = time.monotonic() - job.started
        lines = _messages(job)
        start = next((x["start_rss"] for x in lines if "start_rss" in x), None)
        report = next((x for x in lines if "status" in x), None)
        events = [x for x in lines if "event" in x]
        peak = max(job.peak, usage.ru_maxrss * 1024 - start if start else 0) / 2**20
        stdout = (job.run / "stdout").read_text(errors="replace") if (job.run / "stdout").exists() else ""
        stderr = (job.run / "stderr").read_text(errors="replace") if (job.run / "stderr").exists() else ""
        made = _files([job.case_dir, job.run / "cwd", job.run / "home", job.run / "tmp"]) - job.before
        made = {m for m in made if not m.startswith(str(job.run / "out"))}

        def out(kind: str, finding: str = "", detail: str = "") -> Outcome:
            return Outcome(job.case, job.entry, kind, finding, " ".join(detail.split())[:300], round(peak, 1),
                           round(seconds, 2))

        if job.killed:
            return out("finding", job.killed, f"killed after {seconds:.1f} s at {peak:.0f} MiB above baseline")
        if os.WIFSIGNALED(status):
            return out("finding", "signal", signal.Signals(os.WTERMSIG(status)).name)
        if report is None:
            return out("finding", "crash", f"exit {os.WEXITSTATUS(status)} without a report; {stderr[-200:]}")
        for event in events:  # side effects first: they matter whatever the verdict
            return out("finding", event["event"], event["detail"])
        if made:
            return out("finding", "write", f"new files: {sorted(made)[:3]}")
        if peak * 2**20 > job.limit or report.get("alloc"):
            return out("finding", "memory", f"peak {peak:.0f} MiB above baseline (limit {job.limit / 2**20:.0f} MiB); "
                       f"{report.get('detail', '')}")
        if job.secret and (job.secret in report.get("text", "") or job.secret in stdout):
            return out("finding", "outside", f"the secret planted outside {job.path.name} came back")
        if job.secret and any(job.secret.encode() in p.read_bytes() for p in (job.run / "out").rglob("*")
                              if p.is_file()):
            return out("finding", "outside", "the secret planted outside the path was written to the output")
        if CONTROL.search(stdout + stderr + report.get("detail", "")):
            return out("finding", "control", f"control characters printed: {CONTROL.findall(stdout + stderr + report.get('detail', ''))[:5]!r}")
        status_ = report["status"]
        if status_ == "error":
            return out("finding", "traceback", report["detail"])
        if status_ == "values":
            return out("finding", "values", report["detail"])
        if status_ in ("loaded", "refused"):
            if stderr.strip():
                return out("finding", "stderr", stderr.strip().splitlines()[0])
            if report.get("multiline"):
                return out("finding", "stderr", "error message of several lines")
            return out(status_, "", report.get("detail", ""))
        code, err = report["code"], [x for x in stderr.splitlines() if x.strip()]
        if job.entry == "evaluate" and code == 2 and not err:  # ddp.evaluate logs its one-line error on stdout
            err = [x for x in stdout.splitlines() if x.startswith("error:")][-1:]
        if "Traceback" in stderr:
            return out("finding", "traceback", next((x for x in reversed(err) if not x.startswith(" ")), ""))
        if code == 0:
            return out("loaded") if not err else out("finding", "stderr", err[0])
        if code == 2 and len(err) == 1 and ALLOC_FAILED.search(err[0]):
            return out("finding", "memory", err[0])
        if code == 2 and len(err) == 1 and "Warning" not in err[0]:
            return out("refused", "", err[0])
        return out("finding", "stderr" if code == 2 else "traceback", f"exit {code}: {' | '.join(err)[:250]}")


def main() -> None:
    path, entries = Path(sys.argv[1]), sys.argv[2:] or ENTRIES
    sandbox = Sandbox(Path(tempfile.mkdtemp(prefix="sandbox-")))
    import craft

    benign = craft.real_checkpoints(sandbox.root / "benign")
    sandbox.warm_up(list(benign.values()))
    for o in sandbox.run([Job(path.name, e, path.resolve(), path.resolve().parent) for e in entries]):
        print(json.dumps(asdict(o)))


if __name__ == "__main__":
    main()
