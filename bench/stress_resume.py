"""Kill-and-resume stress of the runner: SIGKILL whole `sweep run`s (parents and workers) at a
random moment, resume, and check every config of the grid ends COMPLETE exactly once.

    python bench/stress_resume.py [--runs 20] [--seed 0] [--kill-after 0 1.5]
    python bench/stress_resume.py --storage postgresql://user@dbhost/db --hosts 2 --runs 10

The seed's 12-config lt-pareto grid on tiny-llama with a 200 + 199 token evaluation (a run takes
a few seconds), 2 workers per run. Default storage: a fresh journal file per run. With
`--storage URL` (PostgreSQL / MySQL) every run is a new study in that database and `--hosts N`
starts N `sweep run`s at once, each as its own host ($TTSWEEP_HOST, its own lock folder), all
killed together; the resume (this process, another host) must recover the dead hosts' trials
through their heartbeats (1 s beats, stale after 3 s here). Prints one line per run and a total
(kills survived, duplicates, gaps); exits 1 if any run ends with a config missing, run twice, or
a trial left RUNNING / WAITING. The kill lands a random 0-1.5 s (`--kill-after`) after the first
trial of the run started, so it hits trials mid-evaluation however slow the start-up is;
`--kill-at-start MIN MAX` counts from the launch instead, to hit start-up too.
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
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study_text(name: str, storage: str | None) -> str:
    text = (ROOT / "studies" / "lt-pareto.toml").read_text().replace('\n  "accuracy",\n', "\n")
    text = text.replace('model = "smollm2-135m"', 'model = "tiny-llama"').replace('name = "lt-pareto"', f'name = "{name}"')
    if storage:
        text = text.replace(f'name = "{name}"', f'name = "{name}"\nstorage = "{storage}"')
    return text.replace("prefill = 512", "prefill = 200").replace("decode = 511", "decode = 199")


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-after", type=float, nargs=2, default=(0.0, 1.5), metavar=("MIN_S", "MAX_S"),
                    help="kill this long after the first trial started (uniform)")
    ap.add_argument("--kill-at-start", type=float, nargs=2, metavar=("MIN_S", "MAX_S"),
                    help="kill this long after the launch instead (uniform), before or after trials start")
    ap.add_argument("--storage", help="a PostgreSQL / MySQL URL shared by the hosts (default: a journal file per run)")
    ap.add_argument("--hosts", type=int, default=1, help="`sweep run`s started (and killed) at once, one per host")
    args = ap.parse_args(argv)
    if args.hosts > 1 and not args.storage:
        ap.error("--hosts needs --storage: a journal file is one machine's")
    return args


def _started(spec) -> bool:
    """Whether a trial of the study has started (RUNNING or finished)."""
    from optuna.trial import TrialState

    from sweep.study import load_study

    try:
        return any(t.state != TrialState.WAITING for t in load_study(spec).get_trials(deepcopy=False))
    except Exception:  # noqa: BLE001 - not created yet
        return False


def _launch_and_kill(args, rng, tmp: str, i: int, name: str):
    """Start run `i` on every host, SIGKILL them all; (the hosts' specs, seconds until the kill)."""
    from sweep.space import load_spec
    from sweep.study import no_live_workers

    paths = []
    for h in range(args.hosts):
        p = Path(tmp) / f"run{i}" / f"host{h}" / "lt.toml"
        p.parent.mkdir(parents=True)
        p.write_text(study_text(name, args.storage))
        paths.append(p)
    procs = [subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(p), "--workers", "2", "--no-progress"],
                              env=dict(os.environ, PYTHONPATH=str(ROOT),
                                       **({"TTSWEEP_HOST": f"stress-host{h}"} if args.storage else {})),
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for h, p in enumerate(paths)]
    specs = [load_spec(p) for p in paths]
    t_start = time.time()
    if args.kill_at_start:
        time.sleep(rng.uniform(*args.kill_at_start))
    else:
        while not _started(specs[0]) and time.time() - t_start < 300:
            time.sleep(0.05)
        time.sleep(rng.uniform(*args.kill_after))
    delay = time.time() - t_start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()
    t_kill = time.time()
    while not all(no_live_workers(s) for s in specs) and time.time() - t_kill < 5:  # workers still exiting
        time.sleep(0.02)
    return specs, delay


def main(argv=None) -> int:
    args = _args(argv)
    if args.storage:
        os.environ.setdefault("SWEEP_HEARTBEAT_S", "1")
        os.environ.setdefault("SWEEP_STALE_S", "3")

    import optuna
    from optuna.trial import TrialState

    from sweep.study import load_study, run, status

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:6]
    bad = dups = gaps = killed = 0
    with tempfile.TemporaryDirectory(prefix="stress-resume-") as tmp:
        for i in range(args.runs):
            specs, delay = _launch_and_kill(args, rng, tmp, i, f"stress-{tag}-{i}")
            spec = specs[0]
            t0 = time.time()
            run(spec, workers=2, progress=False, out=io.StringIO())
            trials = load_study(spec).get_trials(deepcopy=False)
            got = Counter(t.user_attrs.get("config") for t in trials if t.state == TrialState.COMPLETE)
            want = {str(mc) for _, mc in spec.space.grid()}
            counts = status(spec)["counts"]
            requeued = counts["REQUEUED"]
            killed += bool(requeued)
            d, g = sum(n - 1 for n in got.values()), len(want - set(got))
            dups, gaps = dups + d, gaps + g
            ok = not d and not g and set(got) == want and counts["RUNNING"] == counts["WAITING"] == 0
            bad += not ok
            print(f"run {i}: killed at {delay:.1f} s, {requeued} trial(s) killed mid-run and re-queued, "
                  f"resume {time.time() - t0:.1f} s, "
                  f"{counts}: {'ok' if ok else 'BROKEN'}", flush=True)
    where = "a journal file" if not args.storage else f"{args.storage.split('://')[0]}, {args.hosts} host(s)"
    print(f"{args.runs - bad} of {args.runs} kills survived ({where}; {killed} landed mid-trial): every config "
          f"complete exactly once; duplicates {dups}, gaps {gaps}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
