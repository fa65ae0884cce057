"""What a node loss costs: steps redone and seconds until training goes on, by save cadence.

Two hosts made of network namespaces (tests/netns_hosts.py; needs root), launch/torchrun_multinode.sh on
each with NNODES=1:2, fastnet_small on synthetic data (28 steps per epoch, 1 process per host). At the same
point of epoch 2 (a fixed delay after epoch 1's line) every process of host2 is SIGKILLed; host1's worker
fails, its agent restarts it alone, and it resumes from latest.pt. Per run: the step where the loss was
noticed, the step resumed from (their difference is what is redone), and the seconds from the kill to the
resumed line. The baseline (default cadence: latest.pt at each epoch's end) and --save-every-steps N
alternate, A, B, A, B.

    python -m benchmarks.node_loss [--quick] [--save-every-steps 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns_hosts
from test_multihost import ELASTIC, LOST, RESUMED, Agent, agent_env, rank0_output, wait_for

TRAIN = ["--model", "fastnet_small", "--dataset", "synthetic", "--synthetic-size", "3584", "--batch-size", "128",
         "--epochs", "10", "--timeout-min", "0.5"]  # 28 steps per epoch


def one_run(extra: list[str], delay: float) -> tuple[int, int, float]:
    """(step where host1 noticed the loss, step resumed from, seconds from the kill to the resumed line)."""
    with tempfile.TemporaryDirectory() as tmp, netns_hosts.Hosts(2) as hosts:
        cwd = Path(tmp)
        agents = [Agent(hosts, h, cwd, agent_env(**ELASTIC), [*TRAIN, *extra]) for h in (1, 2)]
        wait_for(rank0_output(agents, 120), r"\nepoch 1/10", 120, agents)
        time.sleep(delay)
        hosts.kill_all(2)
        killed = time.monotonic()
        resumed = RESUMED.search(wait_for(agents[0].out, r"resumed from .*now 1 x cpu\)", 120, agents).group(0))
        seconds = time.monotonic() - killed
        lost = LOST.search(agents[0].out.read_text() + agents[0].err.read_text())
        return int(lost["step"]), int(resumed["step"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-every-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--delay", type=float, default=1.5, help="seconds after epoch 1's line to kill host2")
    parser.add_argument("--quick", action="store_true", help="one run of each")
    args = parser.parse_args()
    configs = {"default cadence (each epoch)": [], f"--save-every-steps {args.save_every_steps}":
               ["--save-every-steps", str(args.save_every_steps)]}
    results: dict[str, list[tuple[int, int, float]]] = {name: [] for name in configs}
    for _ in range(1 if args.quick else args.repeats):
        for name, extra in configs.items():
            results[name].append(one_run(extra, args.delay))
            print(f"{name}: lost at step {results[name][-1][0]}, resumed from {results[name][-1][1]}, "
                  f"{results[name][-1][2]:.1f} s", flush=True)
    print("\n| save cadence | steps redone (each run) | kill -> resumed, s (median) |\n|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {', '.join(str(lost - at) for lost, at, _ in runs)} | "
              f"{statistics.median(s for _, _, s in runs):.1f} |")
    print(f"\nnproc {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
