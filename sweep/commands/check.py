"""`sweep check reports/PERF.md [--model M]`: re-evaluate each section's config and fail when
Top-1 or Top-5 is more than 0.5 below the table (tt-metal's test_accuracy.py rule)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("check", help="regression check: re-evaluate a report's configs, fail if accuracy drops > 0.5")
    p.add_argument("report", help="markdown report (PERF.md)")
    p.add_argument("--model", help="check only rows of this model (registry or display name)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.cli import UserError
    from sweep.report import check_report

    from sweep.commands.paths import read_text_file

    path = Path(args.report)
    text = read_text_file(path, "markdown report", "give the seed-format report file, e.g. reports/PERF.md")
    verdicts = check_report(text, model=args.model)
    checked = [v for v in verdicts if v.ok is not None]
    failed = [v for v in checked if not v.ok]
    if not checked:
        which = f" of model {args.model!r}" if args.model else ""
        raise UserError(f"no rows{which} could be checked in {path} (no runnable model with Top-1/Top-5 values)")
    print(f"{len(checked) - len(failed)} passed, {len(failed)} failed, {len(verdicts) - len(checked)} skipped")
    return 1 if failed else 0
