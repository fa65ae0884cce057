"""Peer benchmark: our trainer vs airbench94, airbench94_muon and hiverge's cifar10-speedrun, on the same CPU cores.

Per seed, alternating sides: each peer in one process (torch's default threads, its own code moved to
the CPU, see benchmarks/peers.py), then our trainer under torchrun (default recipe). Wall time runs from
launch to the end of training: a peer's is launch to its PEER_TRAINED line (its per-epoch evaluations and
own final TTA included), ours launch to exit (its evaluations and checkpoints included). Afterwards,
untimed, every final model is scored at each TTA level (none, flip, full: each side's own TTA). Runs
accumulate in ROOT/results.json across invocations (a side and seed run again replaces its earlier run);
a table and headline figures go to stdout, accuracy vs wall time to --png. Each of our epoch checkpoints (kept with
--keep 0) is also scored, untimed, with one view: our accuracy against time, from evaluations the timed
run did not pay for.

    python -m benchmarks.peer --airbench-muon-dir ../cifar10-airbench --hiverge-dir ../cifar10-speedrun
    python -m benchmarks.peer --sides ours hiverge --seeds 2 --hiverge-dir ../cifar10-speedrun   # add runs
    python -m benchmarks.peer --seeds 0 -- --epochs 10             # flags after `--` go to our trainer
    python -m benchmarks.peer --quick --seeds 0                    # smoke run: synthetic data, few steps
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
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import HEADER, OUT, REPO, Row, conditions, markdown_table, save_accuracy_plot, split_passthrough
from benchmarks.peers import PEERS, check_checkout, run_peer
from benchmarks.time_to_accuracy import first_reaching, mmss, read_run, run_trainer

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CPU_FLAGS = ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"]
TTA = ["none", "flip", "full"]
SIDES = ["ours", *PEERS]
RUN_ORDER = [*PEERS, "ours"]  # per seed: the peers, then ours
# --quick: 2048 synthetic training images (a test set of 409): one step an epoch at the peers' batch sizes
# (1024-2000; the two scripts' epochs are fixed: 8 and 7.59), 2 epochs for ours, 3 for airbench94 (its
# last step copies its lookahead EMA, updated every 5 steps, into the net: fewer than 5 steps end at chance).
QUICK_SIZE = 2048
QUICK_EPOCHS = 2
TARGETS = {"airbench94": 0.7, "fastest": 0.9}  # our time to the peer's accuracy, as a fraction of its wall time


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


def by_side(results: dict) -> dict[str, list[dict]]:
    """Runs per side, in SIDES order (an older results file's "peer" is airbench94)."""
    runs = [{**r, "side": "airbench94" if r["side"] == "peer" else r["side"]} for r in results["runs"]]
    return {s: [r for r in runs if r["side"] == s] for s in SIDES if any(r["side"] == s for r in runs)}


def versus(ours: list[dict], peer: str, runs: list[dict], target: float | None) -> list[Row]:
    """Our time to the peer's accuracy, our accuracy at its wall time, and the wall times, ours vs the peer's."""
    peer_acc, peer_wall = mean([r["reported"] for r in runs]), mean([r["wall_s"] for r in runs])
    ours_wall = mean([r["wall_s"] for r in ours])
    reach = [first_reaching([{"wall_s": t, "acc": a} for t, a in r["curve"]], peer_acc) for r in ours]
    reached = None not in reach
    t_reach = mean(reach) if reached else float("nan")
    ours_at = mean([max((a for t, a in r["curve"] if t <= peer_wall), default=float("nan")) for r in ours])
    goal = f"<= {target}x" if target else "-"
    return [Row(f"{peer}: time to {pct(peer_acc)} (its accuracy, own TTA)",
                mmss(t_reach) if reached else f"not reached ({reach.count(None)}/{len(reach)} seeds)",
                mmss(peer_wall), t_reach / peer_wall, goal, reached and t_reach <= target * peer_wall if target else None),
            Row(f"{peer}: accuracy at its wall time ({mmss(peer_wall)})",
                "no point yet" if math.isnan(ours_at) else pct(ours_at), pct(peer_acc), ours_at / peer_acc,
                "higher", ours_at > peer_acc),
            Row(f"{peer}: wall time, launch to trained", mmss(ours_wall), mmss(peer_wall), ours_wall / peer_wall)]


def summarize(results: dict) -> None:
    """The machine, what each peer ran, one row per side (means over seeds, per-seed values), the headlines."""
    m = results["machine"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in m["flags"].items())
    print(f"\n## Peer benchmark\n\nCPU: {m['cpu']} | {flags}\nnproc {m['nproc']} | torch {m['torch']}\n"
          f"before: {m['conditions']}\nafter:  {results.get('conditions_after', '-')}\n")
    sides = by_side(results)
    for side, runs in sides.items():
        if side != "ours":
            print(f"{side}: {runs[-1].get('source', 'airbench 0.1.8 (PyPI)')}")
    table = []
    for side, runs in sides.items():
        per_seed = "; ".join(f"s{r['seed']}: {pct(r['reported'])} {mmss(r['wall_s'])} load "
                             f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}" for r in runs)
        table.append([side, *(pct(mean([r["acc"][t] for r in runs])) for t in TTA), pct(mean([r["reported"] for r in runs])),
                      mmss(mean([r["wall_s"] for r in runs])), f"{mean([r['img_s'] for r in runs]):.0f}", per_seed])
    print("\n" + markdown_table(["side", "acc none", "acc flip", "acc full", "reported", "wall (m:ss)", "train img/s",
                                 "per seed (reported, wall, load 1-min before->after)"], table))
    peers = {s: runs for s, runs in sides.items() if s != "ours"}
    if "ours" not in sides or not peers:
        return
    fastest = min(peers, key=lambda s: mean([r["wall_s"] for r in peers[s]]))
    rows = []
    for peer, runs in peers.items():
        target = TARGETS["fastest"] if peer == fastest else TARGETS.get(peer)
        rows += versus(sides["ours"], peer, runs, target)
    cells = [r.cells() for r in rows]
    for row, cell in zip(rows, cells):
        if math.isnan(row.ratio):
            cell[3] = "-"
    print(f"\nfastest peer here: {fastest}\n\n" + markdown_table([*HEADER[:2], "peer", *HEADER[3:]], cells), flush=True)


def plot(results: dict, png: Path) -> None:
    """Accuracy (%) vs wall time (min): a line per run, each peer's final accuracy (own TTA) as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    colours = dict(zip(SIDES, ["tab:blue", "tab:red", "tab:orange", "tab:green"]))
    styles, markers = ["-", "--", ":", "-."], "os^Dv"
    for side, runs in by_side(results).items():
        for i, run in enumerate(runs):
            xs, ys = [t / 60 for t, _ in run["curve"]], [100 * a for _, a in run["curve"]]
            label = f"{side} seed {run['seed']}"
            if side != "ours":  # per-epoch points (if it logs them) are without TTA; the star is its own TTA
                label += " (star: own TTA)"
                t, a = run["final_point"]
                if xs:
                    ax.plot([xs[-1], t / 60], [ys[-1], 100 * a], color=colours[side], lw=0.8, ls=styles[i % 4], alpha=0.6)
                ax.plot([t / 60], [100 * a], marker="*", ms=12, color=colours[side], ls="none")
            ax.plot(xs, ys, color=colours[side], ls=styles[i % 4], marker=markers[i % 5], ms=4, label=label)
    m = results["machine"]
    ax.set_xlim(left=0)
    save_accuracy_plot(fig, ax, f"CIFAR-10: ours vs peers, {m['cpu']}, {m['nproc']} cores" +
                       (" (synthetic data)" if results.get("quick") else ""), png)


def load_results(path: Path, fresh: dict) -> dict:
    """The results file to add to: the existing one if it was measured the same way, else `fresh`."""
    if not path.exists():
        return fresh
    old = json.loads(path.read_text())
    same = old.get("quick") == fresh["quick"] and old.get("machine", {}).get("cpu") == fresh["machine"]["cpu"]
    if not same or old.get("ours_extra") != fresh["ours_extra"]:
        sys.exit(f"error: {path} holds runs measured otherwise (another CPU, --quick or trainer flags); "
                 "give another --root, or move that file away")
    return old


def main() -> None:
    argv, extra = split_passthrough(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="directory holding cifar-10-batches-py/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sides", nargs="+", choices=SIDES, default=None,
                   help="default: ours, airbench94 and each peer whose checkout is given")
    p.add_argument("--airbench-muon-dir", type=Path, help="a checkout of github.com/KellerJordan/cifar10-airbench")
    p.add_argument("--hiverge-dir", type=Path, help="a checkout of github.com/hiverge/cifar10-speedrun")
    p.add_argument("--nproc", type=int, default=2, help="our processes (torchrun --nproc_per_node)")
    p.add_argument("--root", default=os.path.join(OUT, "peer"), help="runs, the peers' data and results.json")
    p.add_argument("--png", default=os.path.join(REPO, "benchmarks", "peer.png"))
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SIZE} synthetic images, {QUICK_EPOCHS} "
                   "epochs for ours, 3 for airbench94, the scripts' own (one step each)")
    p.add_argument("--from-results", metavar="FILE", help="no training: re-print and re-plot a results.json")
    args = p.parse_args(argv)

    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
    else:
        checkouts = {"airbench94": None, "airbench94_muon": args.airbench_muon_dir, "hiverge": args.hiverge_dir}
        sides = args.sides or ["ours", "airbench94", *(s for s in ("airbench94_muon", "hiverge") if checkouts[s])]
        problems = [why for s in sides if s != "ours" and (why := check_checkout(PEERS[s], checkouts[s]))]
        if problems:
            sys.exit("error: " + "; ".join(problems))
        if args.quick and args.root == p.get_default("root"):  # keep the real runs' files
            args.root += "-quick"
        if args.quick and args.png == p.get_default("png"):
            args.png = os.path.join(args.root, "peer.png")
        root = Path(args.root)
        dataset, size = ("synthetic", QUICK_SIZE) if args.quick else ("cifar10", 0)
        data_flags = ["--dataset", "synthetic", "--synthetic-size", str(size)] if args.quick else []
        ours_extra = ["--epochs", str(QUICK_EPOCHS), *extra] if args.quick else extra
        fresh = {"machine": machine(), "quick": args.quick, "data_dir": args.data_dir, "ours_extra": ours_extra,
                 "runs": []}
        results = load_results(root / "results.json", fresh)
        write_peer_data(dataset, args.data_dir, size, root / "peer_data")  # untimed, each invocation
        for seed in args.seeds:  # alternating sides: airbench94, ..., ours, airbench94, ...
            for side in sorted(sides, key=RUN_ORDER.index):
                run = (run_ours(seed, root, args.nproc, args.data_dir, data_flags, ours_extra) if side == "ours" else
                       run_peer(PEERS[side], checkouts[side], seed, root / "peer_data", args.quick))
                results["runs"] = [r for r in results["runs"] if (r["side"], r["seed"]) != (side, seed)] + [run]
                results["seeds"] = sorted({r["seed"] for r in results["runs"]})
                results["conditions_after"] = conditions()
                (root / "results.json").write_text(json.dumps(results, indent=1))
        print(f"\nwrote {root / 'results.json'}")
    summarize(results)
    plot(results, Path(args.png))


if __name__ == "__main__":
    main()
