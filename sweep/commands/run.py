"""`sweep run STUDY [--workers N] [--torch-device DEV]`: run or resume a study file's sweep."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("run", help="run (or resume) a study: N worker processes on the study's storage")
    p.add_argument("study", help="study file, e.g. studies/lt-pareto.toml")
    p.add_argument("-w", "--workers", type=int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument("--storage", help="override the study file's storage URL (journal:PATH, sqlite:///..., postgresql://...)")
    p.add_argument("--retry-failed", action="store_true",
                   help="queue again the configs whose trials FAILed (NaN logits, errors); by default they stay failed")
    p.add_argument("--torch-device", metavar="DEV",
                   help="torch device of the evaluations (cuda, cuda:1, cpu; default: the engine's). `cuda` gives each "
                        "worker its own GPU; so does a set CUDA_VISIBLE_DEVICES. Not the Wormhole --device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report", metavar="PATH",
                   help="when the study is complete, also write/update this seed-format report (e.g. reports/PERF.md) "
                        "with its points CSV and front export, as `sweep report` does")
    p.add_argument("--plots", metavar="DIR", help="when the study is complete, also write the front plots here (e.g. reports/plots)")
    p.add_argument("--plan", action="store_true",
                   help="only validate the study file and print the plan (space size, skipped configs); writes nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.commands.paths import check_output
    from sweep.space import load_spec
    from sweep.study.runner import check_torch_device

    spec = load_spec(args.study, storage=args.storage)  # validates everything before anything is written
    if args.plan:
        return _plan(spec)
    check_torch_device(args.torch_device)
    check_output(args.report, "--report")
    check_output(args.plots, "--plots", kind="dir")
    from sweep.study import run as run_study

    summary = run_study(spec, workers=args.workers, progress=not args.no_progress, retry_failed=args.retry_failed,
                        torch_device=args.torch_device)
    if summary.worker_errors and summary.counts.get("WAITING", 0):
        return 1
    if args.report or args.plots:
        _write_outputs(args)
    return failed_status("run", args.study, summary.counts, args.storage)


def failed_status(command: str, study: str, counts: dict, storage: str | None = None, rerun: str = "run") -> int:
    """1 with one line on how to retry when the study holds failed trials (counts["FAIL"]: real
    failures, not re-queued ones), else 0. `rerun`: the command that queues them again."""
    import shlex
    import sys

    n = counts.get("FAIL", 0)
    if not n:
        return 0
    again = f"sweep {rerun} {shlex.quote(study)}" + (" --storage URL" if storage else "") + " --retry-failed"
    print(f"sweep {command}: {n} trial(s) failed (reasons above); fix the cause, then run them again with "
          f"`{again}`", file=sys.stderr)
    return 1


def _write_outputs(args) -> None:
    """The report and plots of the finished study: the same code as `sweep report` / `sweep pareto`."""
    import argparse

    from sweep.commands import pareto, report

    common = dict(study=args.study, storage=args.storage, study_name=None, objectives=None)
    if args.report:
        report.run(argparse.Namespace(**common, output=args.report, csv=None, front_dir=None, configs="all"))
    if args.plots:
        pareto.run(argparse.Namespace(**common, out=args.plots))


def _plan(spec) -> int:
    print(f"study {spec.name}: model {spec.model}, devices {', '.join(spec.devices)} (primary {spec.primary})")
    print(f"  objectives: {', '.join(spec.objectives)}"
          + (f"; constraints: {', '.join(c.key for c in spec.constraints)}" if spec.constraints else ""))
    print(f"  eval: prefill {spec.eval['prefill']}, decode {spec.eval['decode']}, windows {spec.eval['windows']}; perf: "
          + ", ".join(f"{k} {v}" for k, v in spec.perf.items()))
    print(f"  space: {spec.space.size} configs, parameters: "
          + ", ".join(f"{p.name}({len(p.choices)})" for p in spec.space.params))
    if spec.is_grid:
        from sweep.study import plan_grid

        kept, skipped = plan_grid(spec)
        print(f"  grid: {len(kept)} to run, {len(skipped)} skipped as equal in numerics to a faster config")
    else:
        s = spec.sampler
        how = (f": the first {s.n_startup} random, then {s.kind.upper()}" if s.kind in ("tpe", "gp")
               else f", population {s.population}" if s.kind == "nsga2" else "")
        print(f"  sampler: {s.kind}, {s.n_trials} trials{how}; seed {s.seed}")
    from sweep.study.storage import redact

    print(f"  storage: {redact(spec.storage)}")
    return 0
