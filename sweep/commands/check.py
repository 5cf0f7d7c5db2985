"""`sweep check reports/PERF.md [--model M] [--windows N]`: re-evaluate each section's config and
fail when Top-1 or Top-5 is more than 0.5 below the table (tt-metal's test_accuracy.py rule).

Each row is measured as its notes line says (prefill, decode and windows); `--windows N` measures
N disjoint windows instead and prints the per-window Top-1 range beside each verdict."""
from __future__ import annotations

from pathlib import Path

from sweep.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("check", help="regression check: re-evaluate a report's configs, fail if accuracy drops > 0.5")
    p.add_argument("report", help="markdown report (PERF.md)")
    p.add_argument("--model", help="check only rows of this model (registry or display name)")
    p.add_argument("--windows", type=int, default=None,
                   help="evaluate N disjoint windows per row (default: what each notes line says, else 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.commands.paths import read_text_file
    from sweep.report import check_report

    path = Path(args.report)
    if args.windows is not None and args.windows < 1:
        raise UserError(f"--windows must be >= 1, not {args.windows}")
    text = read_text_file(path, "markdown report", "give the seed-format report file, e.g. reports/PERF.md")
    verdicts = check_report(text, model=args.model, windows=args.windows)
    checked = [v for v in verdicts if v.ok is not None]
    failed = [v for v in checked if not v.ok]
    if not checked:
        which = f" of model {args.model!r}" if args.model else ""
        raise UserError(f"no rows{which} could be checked in {path} (no runnable model with Top-1/Top-5 values)")
    print(f"{len(checked) - len(failed)} passed, {len(failed)} failed, {len(verdicts) - len(checked)} skipped")
    return 1 if failed else 0
