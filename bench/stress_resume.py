"""Kill-and-resume stress of the runner: SIGKILL a whole `sweep run` (parent and workers) at a
random moment, resume it, and check every config of the grid ends COMPLETE exactly once.

    python bench/stress_resume.py [--runs 20] [--seed 0] [--kill-after 1.6 2.8]

The seed's 12-config lt-pareto grid on tiny-llama with a 200 + 199 token evaluation (a run takes
a few seconds), 2 workers, fresh journal storage per run. Prints one line per run (when the kill
landed, which trials were recovered, the resume's wall time) and exits 1 if any run ends with a
config missing, run twice, or a trial left RUNNING / WAITING. The kill window defaults to the
stretch where trials are running on this machine; widen it to hit start-up and the end too.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study_text() -> str:
    text = (ROOT / "studies" / "lt-pareto.toml").read_text().replace('\n  "accuracy",\n', "\n")
    text = text.replace('model = "smollm2-135m"', 'model = "tiny-llama"')
    return text.replace("prefill = 512", "prefill = 200").replace("decode = 511", "decode = 199")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-after", type=float, nargs=2, default=(1.6, 2.8), metavar=("MIN_S", "MAX_S"))
    args = ap.parse_args(argv)

    import optuna
    from optuna.trial import TrialState

    from sweep.space import load_spec
    from sweep.study import load_study, no_live_workers, run, status

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(args.seed)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = 0
    with tempfile.TemporaryDirectory(prefix="stress-resume-") as tmp:
        for i in range(args.runs):
            path = Path(tmp) / f"run{i}" / "lt.toml"
            path.parent.mkdir()
            path.write_text(study_text())
            spec = load_spec(path)
            proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(path), "--workers", "2", "--no-progress"],
                                    env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay = rng.uniform(*args.kill_after)
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            t_kill = time.time()
            while not no_live_workers(spec) and time.time() - t_kill < 5:  # the workers are still exiting
                time.sleep(0.02)
            t0 = time.time()
            summary = run(spec, workers=2, progress=False, out=io.StringIO())
            trials = load_study(spec).get_trials(deepcopy=False)
            got = Counter(t.user_attrs.get("config") for t in trials if t.state == TrialState.COMPLETE)
            want = {str(mc) for _, mc in spec.space.grid()}
            counts = status(spec)["counts"]
            ok = set(got) == want and set(got.values()) == {1} and counts["RUNNING"] == counts["WAITING"] == 0
            bad += not ok
            print(f"run {i}: killed at {delay:.1f} s, recovered {summary.recovered}, resume {time.time() - t0:.1f} s, "
                  f"{counts}: {'ok' if ok else 'BROKEN'}", flush=True)
    print(f"{args.runs - bad} of {args.runs} runs resumed to every config complete exactly once")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
