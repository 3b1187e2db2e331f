"""Test suite wall time: run pytest serially and/or on N xdist workers, print markdown tables.

Prints one row per run (workers, wall seconds, CPU seconds of pytest and its children, tests
passed/failed/skipped) and, for the first run, the files that take longest (sum of setup + call +
teardown of their tests, from pytest's JUnit XML). Measure only on a quiet machine (`uptime`
load below 1): on shared cores the numbers mean little.

Run:  python scripts/bench_tests.py                   # serial, then -n 2 (the CI command)
      python scripts/bench_tests.py --workers 2 --top 15 -- -m "not slow"
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_suite(workers: int, extra: list[str], junit: Path) -> dict:
    """One `pytest -q` run; wall and CPU time, and the JUnit counts."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    cmd += (["-n", str(workers)] if workers > 1 else []) + extra
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not junit.exists():
        sys.exit(f"pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                 f"{proc.stderr[-3000:]}")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"workers": workers, "wall": wall, "cpu": cpu, "exit": proc.returncode, **counts}


def per_file(junit: Path) -> list[tuple[str, float, int]]:
    """(file, seconds, tests) from a JUnit report, longest first."""
    seconds, tests = collections.Counter(), collections.Counter()
    for case in ET.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x[.Class]
        name = next((p for p in parts if p.startswith("test_")), parts[-1]) + ".py"
        seconds[name] += float(case.get("time", 0))
        tests[name] += 1
    return [(name, secs, tests[name]) for name, secs in seconds.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Arguments after -- go to pytest.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="xdist worker counts to run (1 = serial); default: 1 2")
    parser.add_argument("--top", type=int, default=12, help="files listed, longest first")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    load = os.getloadavg()[0]
    rows, files = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            junit = Path(tmp) / f"junit-{workers}.xml"
            rows.append(run_suite(workers, extra, junit))
            files = files or per_file(junit)
    print(f"load average before the runs: {load:.2f}\n")
    print("| workers | wall s | CPU s | tests | failed | skipped | exit |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['workers']} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['tests']} | "
              f"{r['failures'] + r['errors']} | {r['skipped']} | {r['exit']} |")
    print(f"\nLongest files (run with {args.workers[0]} worker(s); setup + call + teardown):\n")
    print("| file | s | tests |")
    print("| --- | ---: | ---: |")
    for name, secs, n in files[:args.top]:
        print(f"| {name} | {secs:.1f} | {n} |")


if __name__ == "__main__":
    main()
