"""`sweep bench [numerics|engine|perf|sweep|all|allocate|fisher|stream]`: run the benchmark scripts under bench/.

Benchmarks, not tests, check speed and memory targets: each prints its figures as ratios to a
baseline measured in the same run, so a busy shared machine moves both sides alike.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SUITES = ("numerics", "engine", "perf", "sweep")  # `all`
ON_DEMAND = ("allocate", "fisher", "stream")  # long (allocate needs a measured profile; stream writes
# checkpoints of the seed's sizes): not in `all`


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks under bench/ (ratios against same-run baselines)")
    p.add_argument("suite", nargs="?", default="all", choices=SUITES + ON_DEMAND + ("all",))
    p.add_argument("--quick", action="store_true", help="small sizes (seconds to a minute per suite); passed to each script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script (e.g. --repeat 3)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run each suite; the exit status is the first non-zero one of a suite that missed a target."""
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"no bench/ folder at {BENCH_DIR}; run `sweep bench` from a source checkout (pip install -e .)")
    extra = (["--quick"] if args.quick else []) + [a for a in args.args if not (a == "--quick" and args.quick)]
    status = 0
    for suite in SUITES if args.suite == "all" else (args.suite,):
        script = BENCH_DIR / f"bench_{suite}.py"
        if not script.exists():
            raise FileNotFoundError(f"benchmark {script} is missing")
        print(f"== {script.name} {' '.join(extra)}", flush=True)
        saved = sys.argv
        sys.argv = [str(script), *extra]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                code = int(exc.code) if isinstance(exc.code, int) else 1
                print(f"== {script.name}: exit status {code} (a target missed or the run failed)", file=sys.stderr)
                status = status or code
        finally:
            sys.argv = saved
    return status
