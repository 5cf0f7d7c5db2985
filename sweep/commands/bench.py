"""`sweep bench [numerics|engine|perf|sweep|all]`: run the benchmark scripts under bench/.

Benchmarks, not tests, check speed and memory targets: each prints its figures as ratios to a
baseline measured in the same run, so a busy shared machine moves both sides alike.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SUITES = ("numerics", "engine", "perf", "sweep")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks under bench/ (ratios against same-run baselines)")
    p.add_argument("suite", nargs="?", default="all", choices=SUITES + ("all",))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script (e.g. --quick)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"no bench/ folder at {BENCH_DIR}; run `sweep bench` from a source checkout (pip install -e .)")
    for suite in SUITES if args.suite == "all" else (args.suite,):
        script = BENCH_DIR / f"bench_{suite}.py"
        if not script.exists():
            raise FileNotFoundError(f"benchmark {script} is missing")
        print(f"== {script.name} {' '.join(args.args)}", flush=True)
        saved = sys.argv
        sys.argv = [str(script), *args.args]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                return int(exc.code) if isinstance(exc.code, int) else 1
        finally:
            sys.argv = saved
    return 0
