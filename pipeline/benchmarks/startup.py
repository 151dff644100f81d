"""Start-up cost of the commands: `python -m pipeline.benchmarks.startup [--runs N] [--quick]`.

Each command runs as a fresh process, from its start to its exit, `--runs` times (default 7), the commands taking
turns so that a change of load hits them alike; the median wall time is printed next to two references measured in
the same run: the bare interpreter (`python -c pass`, the floor of any command) and `python -c "import torch"` (what
a command that loads torch pays at least). The commands: `eleatt --help`, `eleatt flow --help`, `eleatt prepare
folder --help`, `eleatt classify --help`, `eleatt extract --help` (which still loads torch and Lightning), and a flow
worker's start (`preprocessing.flow._init_worker` in a fresh interpreter: imports, OpenCV, the estimator; what a
spawned worker pays; a forked one inherits the parent's modules and pays less).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import quiet_broken_pipe

REPO = Path(__file__).resolve().parents[2]
WORKER = ("from preprocessing.flow import _init_worker; _init_worker({'method': 'dis', 'preset': 'fast', "
          "'short_side': 256, 'bound': 20.0, 'weights_path': None, 'root': '.', 'out': '.', 'backend': 'pyav'})")


def commands(quick: bool) -> dict[str, list[str]]:
    py = [sys.executable]
    table = {
        "python -c pass (reference)": py + ["-c", "pass"],
        "python -c 'import torch' (reference)": py + ["-c", "import torch"],
        "eleatt --help": py + ["-m", "pipeline", "--help"],
        "eleatt flow --help": py + ["-m", "pipeline", "flow", "--help"],
        "eleatt prepare folder --help": py + ["-m", "pipeline", "prepare", "folder", "--help"],
        "eleatt classify --help": py + ["-m", "pipeline", "classify", "--help"],
        "eleatt extract --help": py + ["-m", "pipeline", "extract", "--help"],
        "flow worker start (spawned)": py + ["-c", WORKER],
    }
    if quick:
        table = {k: v for k, v in table.items() if "torch" not in k and "extract" not in k}
    return table


def time_commands(table: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Wall seconds of each command, `runs` times each, in turns; raises naming a command that fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    times: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(runs):
        for name, command in table.items():
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            times[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {done.returncode}): {done.stderr.decode()[-500:]}")
    return times


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="runs of each command (default 7; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one run, without the commands that load torch")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 7)
    if runs < 1:
        parser.error(f"--runs must be >= 1, got {runs}")
    try:
        times = time_commands(commands(args.quick), runs)
    except RuntimeError as err:
        print(f"startup benchmark: {err}", file=sys.stderr)
        return 1
    print(f"start-up, whole process, median of {runs} runs in turns ({os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}):")
    print(format_table(times))
    return 0


def format_table(times: dict[str, list[float]]) -> str:
    """Median, min and max seconds of each command and its median over the bare interpreter's."""
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["python -c pass (reference)"]
    lines = [f"{'command':<40} {'median s':>9} {'min s':>7} {'max s':>7} {'x python -c pass':>17}"]
    for name, m in med.items():
        lines.append(f"{name:<40} {m:>9.3f} {min(times[name]):>7.3f} {max(times[name]):>7.3f} {m / floor:>17.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
