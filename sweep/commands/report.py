"""`sweep report STUDY -o reports/PERF.md`: seed-format markdown, the points CSV and the front export."""
from __future__ import annotations

from pathlib import Path

from sweep.errors import UserError


def add_study_args(p) -> None:
    p.add_argument("study", help="study file (studies/NAME.toml), journal file (studies/.runs/NAME.log) or storage URL")
    p.add_argument("--storage", help="with a study file: override its storage URL (as in `sweep run --storage`)")
    p.add_argument("--study-name", help="which study, when the storage holds several")
    p.add_argument("--objectives", help="comma-separated objectives for the front (default: the study's), e.g. top1,speed:N150")


def load_analysis(args):
    from sweep.commands.paths import check_study_target
    from sweep.pareto import analyze, open_study

    check_study_target(args.study)
    study = open_study(args.study, args.study_name, getattr(args, "storage", None))
    objectives = [o.strip() for o in args.objectives.split(",")] if getattr(args, "objectives", None) else None
    a = analyze(study, objectives=objectives)
    if not a.points:
        raise UserError(f"study {study.study_name!r} has no COMPLETE trials yet; run `sweep run` first")
    return a


def register(sub) -> None:
    p = sub.add_parser("report", help="write the seed-format report (PERF.md), the points CSV and the front's decoder JSON")
    add_study_args(p)
    p.add_argument("-o", "--output", default="reports/PERF.md", help="markdown report to create or update (default: %(default)s)")
    p.add_argument("--csv", help="CSV of every COMPLETE trial (default: <report dir>/<study>/points.csv)")
    p.add_argument("--front-dir", help="front export folder (default: <report dir>/<study>/front)")
    p.add_argument("--configs", choices=("all", "front"), default="all",
                   help="one section per config ('all', default) or only for front points")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.commands.paths import check_output
    from sweep.report import write_report

    check_output(args.output, "-o", default="reports/PERF.md")
    check_output(args.csv, "--csv")
    check_output(args.front_dir, "--front-dir", kind="dir")
    a = load_analysis(args)
    files = write_report(a, args.output, csv=args.csv, front_dir=args.front_dir, configs=args.configs)
    print(f"{files.report}: {len(files.sections)} sections for {a.info.model} "
          f"({', '.join(s if len(s) < 40 else s[:37] + '...' for s in files.sections[:2])}{', ...' if len(files.sections) > 2 else ''})")
    print(f"{files.csv}: {len(a.points)} points")
    front_dir = Path(files.front[-1]).parent if files.front else None
    print(f"{front_dir}: front trials {', '.join(map(str, a.front_numbers()))} (decoder JSON + optimizations.txt)")
    print(f"hypervolume {a.hypervolume:.6g} over {', '.join(a.info.objectives)} (reference point: {a.reference_text()})")
    return 0
