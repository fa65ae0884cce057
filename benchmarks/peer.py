"""Peer benchmark: our trainer vs airbench94 (`benchmarks/airbench_cpu.py`), side by side on the same CPU cores.

Per seed, alternating: airbench94 (one process, torch's default threads), then our trainer under torchrun
(default recipe). Wall time runs from launch to the end of training: the peer's is launch to its
`AIRBENCH_TRAINED` line (its per-epoch evaluations and final TTA included), ours launch to exit (its
evaluations and checkpoints included). Afterwards, untimed, both final models are scored at each TTA
level (none, flip, full), and each of our epoch checkpoints (kept with --keep 0) with one view: our
accuracy against time, from evaluations the timed run did not pay for. Results go to ROOT/results.json
after every run, a table and headline figures to stdout, accuracy vs wall time to --png.

    python -m benchmarks.peer                                      # real CIFAR-10, seeds 0 1
    python -m benchmarks.peer --seeds 0 -- --epochs 10             # flags after `--` go to our trainer
    python -m benchmarks.peer --quick --seeds 0                    # smoke run: synthetic data, 2-3 epochs
    python -m benchmarks.peer --from-results benchmarks/out/peer/results.json   # re-print and re-plot
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import HEADER, OUT, REPO, Row, conditions, markdown_table, save_accuracy_plot, split_passthrough
from benchmarks.time_to_accuracy import first_reaching, mmss, read_run, run_trainer

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CPU_FLAGS = ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"]
TTA = ["none", "flip", "full"]
QUICK_SIZE = 4096  # synthetic training images in --quick (the test set is a fifth of it)
QUICK_EPOCHS = 2  # ours in --quick (2 steps of 2000)
# The peer in --quick: 12 steps of 1024. airbench's last step copies its lookahead EMA (updated every 5 steps)
# into the net, so a run of fewer than 5 steps ends with the initial weights, at chance accuracy.
QUICK_PEER_EPOCHS = 3
TIME_TARGET = 0.7  # our time to the peer's accuracy, as a fraction of the peer's wall time


def machine() -> dict:
    """CPU model, the SIMD flags that matter for bf16 training, nproc, torch, the load."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    found = re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE)
    flags = set(found.group(1).split()) if found else set()
    return {"cpu": model.group(1).strip() if model else "unknown CPU", "nproc": os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS}, "torch": torch.__version__, "conditions": conditions()}


def write_peer_data(dataset: str, data_dir: str, size: int, dest: Path) -> int:
    """`dest/cifar10/{train,test}.pt` in airbench's format (uint8 NHWC images); the number of training images."""
    from ddp.data import load_split

    (dest / "cifar10").mkdir(parents=True, exist_ok=True)
    n_train = 0
    for train in (True, False):
        images, labels = load_split(dataset, data_dir, size, train)
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": CLASSES},
                   dest / "cifar10" / ("train.pt" if train else "test.pt"))
        n_train = n_train or len(images)
    return n_train


def run_peer(seed: int, data_root: Path, peer_args: list[str], n_train: int) -> dict:
    """airbench94 in a subprocess, its stdout echoed with times since launch and parsed."""
    from benchmarks.airbench_cpu import RESULT, TRAINED, hyp

    cmd = [sys.executable, "-u", "-m", "benchmarks.airbench_cpu", "--seed", str(seed), *peer_args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    print(f"$ (cd {data_root} && {' '.join(cmd)})", flush=True)
    run = {"side": "peer", "seed": seed, "command": cmd, "load_before": os.getloadavg(), "curve": []}
    launch = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=data_root, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    last_train_s = None  # airbench's total_time_seconds after its last epoch: training time only
    for line in proc.stdout:
        t = time.perf_counter() - launch
        print(f"[peer {t:7.1f}s] {line}", end="", flush=True)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and (cells[1].isdigit() or cells[1] == "eval"):
            if cells[1] == "eval":
                run["reported"] = float(cells[5])
            else:
                run["curve"].append([t, float(cells[4])])
                last_train_s = float(cells[6])
        elif line.startswith(TRAINED):
            run["wall_s"] = t
        elif line.startswith(RESULT):
            run["acc"] = json.loads(line[len(RESULT):])
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode})")
    epochs = float(peer_args[peer_args.index("--epochs") + 1]) if "--epochs" in peer_args else hyp["opt"]["train_epochs"]
    batch = hyp["opt"]["batch_size"]
    steps = math.ceil(n_train // batch * epochs)  # as airbench counts them: ceil(len(loader) * epochs), full batches
    run.update(final_point=[run["wall_s"], run["reported"]], img_s=steps * batch / last_train_s,
               load_after=os.getloadavg())
    return run


def evaluate_ours(checkpoint: Path, data_dir: str, data_flags: list[str], tta: str) -> float:
    """Test accuracy (fraction) of our checkpoint with `python -m ddp.evaluate --tta`."""
    cmd = [sys.executable, "-m", "ddp.evaluate", "--checkpoint", str(checkpoint), "--data-dir", data_dir,
           *data_flags, "--tta", tta]
    out = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    found = re.search(r"accuracy ([\d.]+)%", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return float(found.group(1)) / 100


def run_ours(seed: int, root: Path, nproc: int, data_dir: str, data_flags: list[str], extra: list[str]) -> dict:
    """Our trainer under torchrun (timed: launch to exit), then its final weights at each TTA level (untimed)."""
    run_dir = root / f"ours-seed{seed}"
    load_before = os.getloadavg()
    run_trainer(run_dir, nproc, data_dir, [*data_flags, "--seed", str(seed), "--keep", "0", *extra])
    load_after = os.getloadavg()
    tb = read_run(run_dir)
    imgs = [r["img_s"] for r in tb["rows"] if not math.isnan(r["img_s"])]
    acc = {tta: evaluate_ours(run_dir / "checkpoints" / "latest.pt", data_dir, data_flags, tta) for tta in TTA}
    # each epoch's checkpoint scored now, untimed (one view), at the time its epoch ended; then the run's own end
    epochs = common.untimed_epoch_curve(run_dir, tb["meta"]["launch"],
                                        lambda f: evaluate_ours(Path(f), data_dir, data_flags, "none"))
    curve = epochs[:-1] + [[r["wall_s"], r["acc"]] for r in tb["rows"]]
    return {"side": "ours", "seed": seed, "command": tb["meta"]["command"], "wall_s": tb["total_s"], "acc": acc,
            "reported": tb["rows"][-1]["acc"], "curve": curve,
            "img_s": statistics.mean(imgs) if imgs else float("nan"), "load_before": load_before,
            "load_after": load_after}


def mean(xs: list[float]) -> float:
    return statistics.mean(xs)


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def summarize(results: dict) -> None:
    """The machine, one row per side (means over seeds, per-seed values), then the headline figures."""
    m = results["machine"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in m["flags"].items())
    print(f"\n## Peer benchmark: ours vs airbench94\n\nCPU: {m['cpu']} | {flags}\n"
          f"nproc {m['nproc']} | torch {m['torch']}\nbefore: {m['conditions']}\n"
          f"after:  {results.get('conditions_after', '-')}\n")
    sides = {s: [r for r in results["runs"] if r["side"] == s] for s in ("peer", "ours")}
    table = []
    for side, runs in sides.items():
        if not runs:
            continue
        per_seed = "; ".join(f"s{r['seed']}: {pct(r['reported'])} {mmss(r['wall_s'])} load "
                             f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}" for r in runs)
        table.append([side, *(pct(mean([r["acc"][t] for r in runs])) for t in TTA), pct(mean([r["reported"] for r in runs])),
                      mmss(mean([r["wall_s"] for r in runs])), f"{mean([r['img_s'] for r in runs]):.0f}", per_seed])
    print(markdown_table(["side", "acc none", "acc flip", "acc full", "reported", "wall (m:ss)", "train img/s",
                          "per seed (reported, wall, load 1-min before->after)"], table))
    if not (sides["peer"] and sides["ours"]):
        return
    peer_acc = mean([r["reported"] for r in sides["peer"]])
    peer_wall = mean([r["wall_s"] for r in sides["peer"]])
    ours_wall = mean([r["wall_s"] for r in sides["ours"]])
    reach = [first_reaching([{"wall_s": t, "acc": a} for t, a in r["curve"]], peer_acc) for r in sides["ours"]]
    reached = None not in reach
    t_reach = mean(reach) if reached else float("nan")
    at_peer = [max((a for t, a in r["curve"] if t <= peer_wall), default=float("nan")) for r in sides["ours"]]
    ours_at = mean(at_peer)
    rows = [Row(f"time to {pct(peer_acc)} (peer's reported accuracy)",
                mmss(t_reach) if reached else f"not reached ({reach.count(None)}/{len(reach)} seeds)",
                mmss(peer_wall), t_reach / peer_wall, f"<= {TIME_TARGET}x", reached and t_reach <= TIME_TARGET * peer_wall),
            Row(f"accuracy at the peer's wall time ({mmss(peer_wall)})",
                "no point yet" if math.isnan(ours_at) else pct(ours_at), pct(peer_acc), ours_at / peer_acc,
                "higher", ours_at > peer_acc),
            Row("wall time, launch to trained", mmss(ours_wall), mmss(peer_wall), ours_wall / peer_wall)]
    cells = [r.cells() for r in rows]
    if not reached:
        cells[0][3] = "-"
    print("\n" + markdown_table([*HEADER[:2], "airbench94", *HEADER[3:]], cells))
    print(f"\n(1) time to the peer's accuracy: {'met' if rows[0].met else 'NOT met'}; "
          f"(2) accuracy at the peer's wall time: {'met' if rows[1].met else 'NOT met'}; "
          f"(3) wall time ours/peer {ours_wall / peer_wall:.2f}x", flush=True)


def plot(results: dict, png: Path) -> None:
    """Accuracy (%) vs wall time (min): a line per run, the peer's final TTA accuracy as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    colours, styles, markers = {"peer": "tab:red", "ours": "tab:blue"}, ["-", "--", ":", "-."], "os^Dv"
    for run in results["runs"]:
        i = results["seeds"].index(run["seed"]) if run["seed"] in results["seeds"] else 0
        xs, ys = [t / 60 for t, _ in run["curve"]], [100 * a for _, a in run["curve"]]
        label = f"{'airbench94' if run['side'] == 'peer' else 'ours'} seed {run['seed']}"
        if run["side"] == "peer":  # the per-epoch points are without TTA; the last point is airbench's TTA figure
            label += " (epochs: no TTA; star: TTA level 2)"
            t, a = run["final_point"]
            ax.plot([xs[-1], t / 60] if xs else [], [ys[-1], 100 * a] if ys else [], color=colours["peer"], lw=0.8,
                    ls=styles[i % 4], alpha=0.6)
            ax.plot([t / 60], [100 * a], marker="*", ms=12, color=colours["peer"], ls="none")
        ax.plot(xs, ys, color=colours[run["side"]], ls=styles[i % 4], marker=markers[i % 5], ms=4, label=label)
    peers = [r for r in results["runs"] if r["side"] == "peer"]
    if peers:  # what the headline figures compare against: the peer's mean wall time and reported accuracy
        ax.axvline(statistics.mean(r["wall_s"] for r in peers) / 60, ls=":", lw=1, color="grey")
        ax.axhline(100 * statistics.mean(r["reported"] for r in peers), ls=":", lw=1, color="grey")
    m = results["machine"]
    ax.set_xlim(left=0)
    save_accuracy_plot(fig, ax, f"CIFAR-10: ours vs airbench94, {m['cpu']}, {m['nproc']} cores" +
                       (" (synthetic data)" if results.get("quick") else ""), png)


def main() -> None:
    argv, extra = split_passthrough(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="directory holding cifar-10-batches-py/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--nproc", type=int, default=2, help="our processes (torchrun --nproc_per_node)")
    p.add_argument("--root", default=os.path.join(OUT, "peer"), help="runs, airbench's data and results.json")
    p.add_argument("--png", default=os.path.join(REPO, "benchmarks", "peer.png"))
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SIZE} synthetic images, {QUICK_EPOCHS} epochs for ours, "
                   f"{QUICK_PEER_EPOCHS} for airbench")
    p.add_argument("--from-results", metavar="FILE", help="no training: re-print and re-plot a results.json")
    args = p.parse_args(argv)

    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
    else:
        if args.quick and args.root == p.get_default("root"):  # keep the real runs' files
            args.root += "-quick"
        if args.quick and args.png == p.get_default("png"):
            args.png = os.path.join(args.root, "peer.png")
        root = Path(args.root)
        dataset, size = ("synthetic", QUICK_SIZE) if args.quick else ("cifar10", 0)
        data_flags = ["--dataset", "synthetic", "--synthetic-size", str(size)] if args.quick else []
        ours_extra = ["--epochs", str(QUICK_EPOCHS), *extra] if args.quick else extra
        peer_args = ["--epochs", str(QUICK_PEER_EPOCHS)] if args.quick else []
        results = {"machine": machine(), "seeds": args.seeds, "quick": args.quick, "data_dir": args.data_dir,
                   "ours_extra": ours_extra, "runs": []}
        n_train = write_peer_data(dataset, args.data_dir, size, root / "airbench_data")  # untimed, once
        for seed in args.seeds:  # alternating: peer, ours, peer, ours, ...
            results["runs"].append(run_peer(seed, root / "airbench_data", peer_args, n_train))
            (root / "results.json").write_text(json.dumps(results, indent=1))
            results["runs"].append(run_ours(seed, root, args.nproc, args.data_dir, data_flags, ours_extra))
            results["conditions_after"] = conditions()
            (root / "results.json").write_text(json.dumps(results, indent=1))
        print(f"\nwrote {root / 'results.json'}")
    summarize(results)
    plot(results, Path(args.png))


if __name__ == "__main__":
    main()
