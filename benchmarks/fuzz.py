"""Fuzz the checkpoint reader: structure-aware mutants of real checkpoints through every entry point.

Each mutant (tests/fuzzing.py: pickle opcodes, zip fields, safetensors/index JSON, DCP Metadata, symlinks,
FIFOs, byte flips) goes through three entry points picked at random, each run in a forked child that is
watched for signals, time, memory, imports, sockets and writes (tests/sandbox_run.py). Prints cases tried,
distinct outcomes (layout | entry point | outcome | finding | error class), findings, and the longest run
of consecutive mutants without a finding; reproducers of findings are kept under --out.

    python -m benchmarks.fuzz --minutes 10 --out benchmarks/out/fuzz
    python -m benchmarks.fuzz --cases 200 --seed 3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="run this long (default: 5, unless --cases)")
    p.add_argument("--cases", type=int, default=None, help="stop after this many mutants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "fuzz"),
                   help="where reproducers of findings are copied")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one entry point may take on one mutant")
    p.add_argument("--entries", type=int, default=3, help="entry points per mutant (of 9)")
    args = p.parse_args()
    minutes = args.minutes if args.minutes is not None or args.cases is not None else 5.0

    import fuzzing

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        stats = fuzzing.campaign(Path(tmp), seed=args.seed, cases=args.cases,
                                 seconds=minutes * 60 if minutes is not None else None,
                                 entries_per_case=args.entries, timeout=args.timeout, out=out,
                                 log=lambda line: print(line, flush=True))
    wall = time.monotonic() - start
    print(f"\nfuzz: seed {args.seed}, {wall / 60:.1f} min on {cpu_name()} ({os.cpu_count()} cores)")
    print(f"cases tried      {stats['cases']} ({stats['runs']} entry-point runs, {stats['cases'] / wall:.1f} cases/s)")
    print(f"distinct outcomes {len(stats['outcomes'])}")
    for sig, count in sorted(stats["outcomes"].items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {count:6d}  {sig}")
    findings = stats["findings"]
    print(f"findings         {len(findings)} in {len({name for name, _ in findings})} mutants"
          + (f" (reproducers under {out})" if findings else ""))
    kinds: dict[str, int] = {}
    for _, o in findings:
        kinds[f"{o.entry}: {o.finding}"] = kinds.get(f"{o.entry}: {o.finding}", 0) + 1
    for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {count:6d}  {kind}")
    print(f"longest clean run {stats['longest_clean']} consecutive mutants without a finding")


if __name__ == "__main__":
    main()
