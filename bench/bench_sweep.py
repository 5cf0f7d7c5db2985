"""Wall time of the lt-pareto study (12 configs) with 1 and with 2 worker processes.

    python bench/bench_sweep.py            # studies/lt-pareto.toml as shipped (SmolLM2-135M, 512 + 511)
    python bench/bench_sweep.py --quick    # the same 12 configs on tiny-llama, prefill 32 + decode 31
    sweep bench sweep [--quick]

Each run uses fresh journal storage in a temporary folder, so every config is evaluated; the
fp32 reference and the model are loaded once before timing (cached on disk), so both runs start
from the same warm state. Printed: wall time per worker count, seconds per trial, and the ratio
of the 2-worker time to the 1-worker time (same run, same machine: a busy machine moves both).
Workers get cores / workers torch threads each; on a busy machine multi-threaded torch suffers
much more than single-threaded workers, so compare also with SWEEP_WORKER_THREADS=1.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study_text(args) -> str:
    text = (ROOT / "studies" / "lt-pareto.toml").read_text()
    if args.quick:
        args.model, args.prefill, args.decode = args.model or "tiny-llama", args.prefill or 32, args.decode or 31
    if args.model:
        text = re.sub(r'(?m)^model = ".*"$', f'model = "{args.model}"', text)
    if args.prefill:
        text = re.sub(r"(?m)^prefill = 512$", f"prefill = {args.prefill}", text)
    if args.decode:
        text = re.sub(r"(?m)^decode = 511$", f"decode = {args.decode}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama with a 32 + 31 token evaluation (seconds, not minutes)")
    ap.add_argument("--model", help="override the study's model")
    ap.add_argument("--prefill", type=int, help="override the evaluation prefill")
    ap.add_argument("--decode", type=int, help="override the evaluation decode")
    ap.add_argument("--workers", default="1,2", help="worker counts to time (default: %(default)s)")
    args = ap.parse_args(argv)

    from sweep.space import load_spec
    from sweep.study import run, worker_threads

    text = study_text(args)
    counts = [int(x) for x in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        base = Path(tmp)
        probe = base / "probe" / "lt-pareto.toml"
        probe.parent.mkdir()
        probe.write_text(text)
        spec = load_spec(probe)
        print(f"bench_sweep: {spec.name} on {spec.model}, eval prefill {spec.eval['prefill']} + decode "
              f"{spec.eval['decode']}, {spec.space.size} configs, devices {', '.join(spec.devices)}; "
              f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores", flush=True)
        t0 = time.perf_counter()
        from engine.accuracy.evaluator import Evaluator

        Evaluator(spec.model, prefill=spec.eval["prefill"], decode=spec.eval["decode"])  # reference cached once
        print(f"  warm-up (model + fp32 reference, cached): {time.perf_counter() - t0:.1f} s", flush=True)
        times = {}
        for n in counts:
            d = base / f"w{n}"
            d.mkdir()
            (d / "lt-pareto.toml").write_text(text)
            s = load_spec(d / "lt-pareto.toml")
            t0 = time.perf_counter()
            summary = run(s, workers=n, progress=False, out=io.StringIO())
            wall = time.perf_counter() - t0
            done = summary.counts["COMPLETE"]
            if done != s.space.size:
                print(f"  {n} worker(s): only {done} of {s.space.size} trials complete: {summary.counts}", flush=True)
                return 1
            times[n] = wall
            print(f"  {n} worker(s) ({worker_threads(n)} torch threads each): {wall:7.1f} s wall, "
                  f"{wall / done:.2f} s per trial (load average {os.getloadavg()[0]:.1f})", flush=True)
    if 1 in times:
        for n, t in times.items():
            if n != 1:
                print(f"  ratio {n} workers / 1 worker: {t / times[1]:.2f} (speed-up {times[1] / t:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
