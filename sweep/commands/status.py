"""`sweep status STUDY [--json]`: trial counts by state, workers per host, failures with their reasons."""
from __future__ import annotations

import json

JSON_KEYS = ("COMPLETE", "FAIL", "REQUEUED", "RUNNING", "WAITING")


def register(sub) -> None:
    p = sub.add_parser("status", help="counts of a study's trials by state, workers per host, and the failures")
    p.add_argument("study", help="study file, e.g. studies/lt-pareto.toml")
    p.add_argument("--storage", help="override the study file's storage URL")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"COMPLETE": n, "FAIL": n, "REQUEUED": n, "RUNNING": n, "WAITING": n}; '
                        "FAIL counts real failures only, REQUEUED the trials of dead or interrupted workers whose "
                        "config was queued again")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.space import load_spec
    from sweep.study import status
    from sweep.study.storage import redact

    spec = load_spec(args.study, storage=args.storage)
    st = status(spec)
    counts = st["counts"]
    if args.json:
        print(json.dumps({k: v for k, v in counts.items() if k in JSON_KEYS or v}))
        return 0
    if st["note"]:
        print(f"study {spec.name}: {st['note']}")
    total = st.get("total")
    print(f"study {spec.name} ({redact(spec.storage)}): "
          + ", ".join(f"{k} {v}" for k, v in counts.items())
          + (f"; {st['done']} of {total} done" if total else ""))
    if st["hosts"]:
        print("  workers running trials: " + "; ".join(
            f"{h}: {len(p)} (pid{'s' if len(p) > 1 else ''} {', '.join(map(str, p))})" for h, p in st["hosts"].items()))
    if st.get("skipped") is not None:
        print(f"  {st['skipped']} grid configs skipped as equal in numerics to a faster config")
    for f in st["failures"]:
        tag = " (re-queued)" if f["superseded"] else ""
        print(f"  trial {f['number']} FAIL{tag}: {f['reason']}")
        if f["config"]:
            print(f"      {f['config']}")
    for r in st["running"]:
        w = r["worker"]
        who = f"pid {w.get('pid')} on {w.get('host')}" if w else "no worker recorded"
        print(f"  trial {r['number']} RUNNING ({who}{'' if r['alive'] else ', worker gone: `sweep run` will re-queue it'})")
    return 0
