"""`sweep pareto STUDY [--out reports/plots] [--html reports/index.html]`: front plots (PNG + SVG) per
model and device with an index page; `--html` also writes one self-contained interactive page."""
from __future__ import annotations

from pathlib import Path

from sweep.commands.report import add_study_args, load_analysis
from sweep.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("pareto", help="plot the fronts (speed/TTFT vs Top-1, Top-1 vs Top-5) and write an index page")
    add_study_args(p)
    p.add_argument("--out", default="reports/plots", help="output folder (default: %(default)s)")
    p.add_argument("--html", metavar="PATH", help="also write one self-contained interactive page (plotly bundled: "
                                                  "opens offline in any browser), e.g. reports/index.html")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.commands.paths import check_output
    from sweep.plots import write_plots

    check_output(args.out, "--out", kind="dir", default="reports/plots")
    if getattr(args, "html", None) and Path(args.html).is_dir():
        raise UserError(f"--html {args.html} is a directory; give the page's file name, e.g. {Path(args.html) / 'index.html'}")
    check_output(getattr(args, "html", None), "--html")
    a = load_analysis(args)
    res = write_plots(a, args.out)
    print(f"{len(res.images)} plots under {args.out}; index: {res.index}")
    if getattr(args, "html", None):
        from sweep.html import write_page

        print(f"interactive page: {write_page(a, args.html)}")
    for dev, df in a.devices.items():
        print(f"{dev}: Top-1/speed front = trials {', '.join(map(str, df.front))}; knee {df.knee}; "
              f"within noise {', '.join(map(str, df.within_noise)) or 'none'} ({df.noise_rule})")
    return 0
