"""`sweep pareto STUDY [--out reports/plots]`: front plots (PNG + SVG) per model and device and an index page."""
from __future__ import annotations

from sweep.commands.report import add_study_args, load_analysis


def register(sub) -> None:
    p = sub.add_parser("pareto", help="plot the fronts (speed/TTFT vs Top-1, Top-1 vs Top-5) and write an index page")
    add_study_args(p)
    p.add_argument("--out", default="reports/plots", help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.plots import write_plots

    a = load_analysis(args)
    res = write_plots(a, args.out)
    print(f"{len(res.images)} plots under {args.out}; index: {res.index}")
    for dev, df in a.devices.items():
        print(f"{dev}: Top-1/speed front = trials {', '.join(map(str, df.front))}; knee {df.knee}; "
              f"within noise {', '.join(map(str, df.within_noise)) or 'none'} ({df.noise_rule})")
    return 0
