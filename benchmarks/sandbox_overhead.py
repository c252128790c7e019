"""What does running a program in llm_rl.sandbox cost over a plain subprocess?

Median wall time of ``pass`` over 20 runs (after one warm-up) for: a plain
``subprocess.run([python, "-c", "pass"])``, the isolated interpreter alone (``-I -S``), and
``sandbox.run`` at every isolation level this machine offers; ratios to the plain subprocess
measured in the same process.

    PYTHONPATH=. .venv/bin/python benchmarks/sandbox_overhead.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from llm_rl import sandbox


def _timed(argv: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cases = {"plain subprocess python -c pass": lambda: _timed([sys.executable, "-c", "pass"]),
             "python -I -S -c pass": lambda: _timed([sys.executable, "-I", "-S", "-c", "pass"])}
    for level in sandbox.available_levels():
        cases[f"sandbox.run, level {level}"] = (
            lambda level=level: sandbox.run("pass", timeout_s=10, memory_mb=256, level=level).wall_s)
    medians = {}
    for name, fn in cases.items():
        fn()  # warm-up
        medians[name] = statistics.median(fn() for _ in range(args.repeats))
    base = medians["plain subprocess python -c pass"]
    print("| what | median ms | ratio to plain subprocess |\n|---|---|---|")
    for name, v in medians.items():
        print(f"| {name} | {v * 1000:.1f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
