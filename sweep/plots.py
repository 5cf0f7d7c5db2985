"""Front plots (PNG + SVG, matplotlib Agg) and an index page.

Per model and device: Speed (t/s/u) vs Top-1 (%) (lt's plot: points numbered by trial, the front
as a red line, a footnote table mapping each number to its config, wrapped), TTFT (ms) vs Top-1
(%); per model: Top-1 vs Top-5 (accuracy does not depend on the device). Accuracy error bars are
the 95% Wilson intervals. Fronts are the 2-D fronts of each projection (sweep.pareto), not
Optuna's plot. Points "within noise of the front" follow sweep.pareto's rule (a paired test on the
per-token records; the footnote and the index page name the test used).

Speed and TTFT error bars are BETWEEN-CONFIG intervals (engine.perf.calibrate.between_interval): the 90%
interval of each config's figure relative to one reference config (the device's knee; its own bar
is nil), i.e. the error of the predicted RATIO between two configs of one model on one device,
which is what choosing among them depends on. They come from a quantile fit of the errors of the
predicted ratios between configs of one published setting in the calibration data, half-width
a + b |log ratio| (engine.perf.calibrate.between_config_fit). The model's absolute error (the 90%
prediction interval of engine.perf.model.interval: a per-model, per-device offset, largely common to
all configs) would move every point together; it is stated once, under the title and in the
footnote, not drawn on every point, where it would hide the differences between configs.

Files are deterministic (`save_figure`): SVG with a fixed `svg.hashsalt` (clip-path and glyph
ids) and no Date or Creator metadata, PNG without the Software text chunk; rendering the same
study twice writes the same bytes.
"""
from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from engine.vocab.config import Config
from sweep.objectives import OBJECTIVES, kind_of, perf_metric, wilson
from sweep.objectives import label as _label
from sweep.pareto import Analysis, Point, front_2d
from sweep.report import calibration_text, display_name

MAX_NUMBERED = 40  # above this many points only front points get numbers (and error bars fade)
C_POINT, C_FRONT, C_NOISE, C_KNEE, C_ALLOC = "#4c72b0", "#d62728", "#ff9f1c", "#2ca02c", "#7b2cbf"


def short_config(config: str) -> str:
    """Config.diff() without the precision_cfg/fidelity_cfg wrappers: `ff1_3: bfp4, li_ff1_3: lofi`."""
    head, sep, tail = config.partition("; decoders = {")
    try:
        d = Config.parse(head).diff()
    except Exception:  # noqa: BLE001 - show what we have
        return config
    d = re.sub(r"(precision_cfg|fidelity_cfg) = \{([^}]*)\}", r"\2", d)
    if sep:
        n = tail.count(";") + 1
        d += f" + {n} per-layer override{'s' if n != 1 else ''}"
    return d


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


SVG_SALT = "ttsweep"  # svg.hashsalt: fixed clip-path / glyph ids, the same bytes on every re-run
FOOT_CHARS = 128  # footnote line length (7.5 pt monospace on a 9-inch figure, with margins)


def save_figure(fig, png: Path | None = None, svg: Path | None = None) -> None:
    """Write `fig` deterministically: SVG ids from a fixed salt and no Date / Creator metadata
    (no timestamp, no version string), PNG without the Software text chunk."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": SVG_SALT}):
        if png is not None:
            fig.savefig(png, metadata={"Software": None})
        if svg is not None:
            fig.savefig(svg, metadata={"Date": None, "Creator": None})


def _ci(p: Point, objective: str, reference: Point | None = None) -> tuple[float, float] | None:
    """The error bar of one point: the 95% Wilson interval for Top-1 / Top-5; for speed / TTFT the
    between-config interval relative to `reference` (engine.perf.calibrate.between_interval; nil for the
    reference itself)."""
    if wilson(objective):
        return tuple(getattr(p.record, f"{objective}_ci"))
    pm = perf_metric(objective)
    if pm and reference is not None:
        from engine.perf.calibrate import between_interval

        if p.number == reference.number:  # its ratio to itself is known: 1
            return (p.value(objective), p.value(objective))
        return between_interval(pm[0], p.value(objective), reference.value(objective), pm[1], p.record.model)
    return None


def absolute_interval(objective: str, reference: Point) -> tuple[float, float] | None:
    """(low, high) of the performance model's absolute 90% prediction interval at the reference
    point (engine.perf.model.interval): the error common to every config of the model on the device."""
    pm = perf_metric(objective)
    if not pm:
        return None
    from engine.perf.model import interval

    iv = interval(pm[0], reference.value(objective), pm[1], reference.record.model)
    return None if iv is None else iv[:2]


def _short(objective: str) -> str:
    """The prose name of a performance objective's kind: `speed`, `TTFT`."""
    return OBJECTIVES[perf_metric(objective)[0]].short


def absolute_text(objective: str, reference: Point) -> str:
    """"absolute error, common to all configs: -22.5/+27.4 t/s/u (90%)", or "" without a calibration."""
    iv = absolute_interval(objective, reference)
    if iv is None:
        return ""
    v = reference.value(objective)
    o = kind_of(objective)
    nd = o.decimals
    return (f"absolute error, common to all configs: "
            f"-{v - iv[0]:.{nd}f}/+{iv[1] - v:.{nd}f} {o.unit} (90%)")


def _err_label(x: str, y: str, xerr, yerr, reference: Point | None) -> str | None:
    if not (perf_metric(x) or perf_metric(y)):
        return "95% Wilson interval" if (xerr or yerr) else None
    kinds = []
    for o, e in ((x, xerr), (y, yerr)):
        if not e:
            continue
        if perf_metric(o):
            kinds.append(f"{_short(o)}: 90% between configs, vs trial {reference.number}")
        else:
            kinds.append(f"{OBJECTIVES[o].short}: 95% Wilson")
    return " / ".join(dict.fromkeys(kinds)) or None


def _err(points: Sequence[Point], objective: str, reference: Point | None = None):
    cis = [_ci(p, objective, reference) for p in points]
    if any(c is None for c in cis):
        return None
    vals = [p.value(objective) for p in points]
    return [[max(0.0, v - c[0]) for v, c in zip(vals, cis)], [max(0.0, c[1] - v) for v, c in zip(vals, cis)]]


def _usable(points, objs):
    out = []
    for p in points:
        try:
            if all(math.isfinite(p.value(o)) for o in objs):
                out.append(p)
        except KeyError:
            pass
    return out


def _label_offsets() -> list[tuple[float, float]]:
    """Candidate label offsets (points): the close ring first, then rings further out whose labels
    get a thin leader line, so a tight cluster of points still gets one readable label each."""
    near = [(8, -3), (-8, -3), (5, 4), (5, -11), (-5, 4), (-5, -11), (0, 7), (0, -14), (12, 10), (-12, 10),
            (12, -17), (-12, -17)]  # level to the right first: the label reads as the point's
    far = []
    for r in (22, 34, 48, 64):
        for k in range(16):
            a = 2 * math.pi * k / 16
            far.append((round(r * math.cos(a)), round(r * math.sin(a)) - 3))
    return near + far


def _place_labels(ax, fig, xs, ys, texts, colors, rings=(), lines=()):
    """Number the points, choosing for each label the offset that overlaps least with the labels,
    markers and `lines` (polylines in data coordinates, e.g. the front) already drawn (greedy;
    good enough for tens of points). Labels moved out of a cluster are joined to their point by a
    leader line. Returns the placed labels' pixel boxes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axb = ax.get_window_extent(renderer)
    marker_boxes = []
    for x, y in zip(xs, ys):
        px, py = ax.transData.transform((x, y))
        marker_boxes.append((px - 8, py - 8, px + 8, py + 8))  # a marker and a little air around it
    for bx, by, r in rings:
        px, py = ax.transData.transform((bx, by))
        marker_boxes.append((px - r, py - r, px + r, py + r))
    for lx, ly in lines:  # a line counts as a row of small boxes along it, a few pixels apart
        pix = [tuple(ax.transData.transform((x, y))) for x, y in zip(lx, ly)]
        for (x0, y0), (x1, y1) in zip(pix, pix[1:]):
            n = max(1, int(math.hypot(x1 - x0, y1 - y0) / 4))
            for k in range(n + 1):
                px, py = x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n
                marker_boxes.append((px - 1.5, py - 1.5, px + 1.5, py + 1.5))
    placed = []
    offsets = _label_offsets()
    n_near = 12
    pt = fig.dpi / 72.0  # pixels per point
    for x, y, t, c in _merge_stacked(ax, xs, ys, texts, colors):
        best = None  # (cost, dx, dy, box)
        for i, (dx, dy) in enumerate(offsets):
            ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
            ann = ax.annotate(t, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha, va="bottom")
            bb = ann.get_window_extent(renderer)
            ann.remove()
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            clash = sum(_overlap(box, b) for b in placed) * 3 + sum(_overlap(box, b) for b in marker_boxes)
            clash += 1000 * (box[0] < axb.x0 or box[2] > axb.x1 or box[1] < axb.y0 or box[3] > axb.y1)
            cost = clash + 0.05 * math.hypot(dx, dy) * pt  # prefer the closest free spot
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if clash == 0 and i < n_near:
                break
        _, dx, dy, box = best
        far = math.hypot(dx, dy) > 18
        ax.annotate(t, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, color=c,
                    ha="left" if dx > 0 else ("right" if dx < 0 else "center"), va="bottom", zorder=6,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75),  # readable over error bars
                    arrowprops=dict(arrowstyle="-", color=c, lw=0.6, alpha=0.7, shrinkA=1, shrinkB=4) if far else None)
        placed.append(box)
    return placed


def _merge_stacked(ax, xs, ys, texts, colors, px: float = 6.0):
    """Points whose markers overlap on screen (within `px` pixels) get one label listing their
    numbers top to bottom ("8, 12, 7, 5"), placed at the top one: separate numbers next to one blob
    cannot be told apart. A cluster with a colored (front) member takes that color."""
    pos = [tuple(ax.transData.transform((x, y))) for x, y in zip(xs, ys)]
    parent = list(range(len(pos)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(pos)):
        for j in range(i):
            if abs(pos[i][0] - pos[j][0]) <= px and abs(pos[i][1] - pos[j][1]) <= px:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(pos)):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        members.sort(key=lambda i: -pos[i][1])  # top first
        colored = [colors[i] for i in members if colors[i] != "#222222"]
        color = colored[0] if colored else colors[members[0]]
        x = sum(xs[i] for i in members) / len(members)  # labelled at the cluster's centre
        y = sum(ys[i] for i in members) / len(members)
        out.append((x, y, ", ".join(texts[i] for i in members), color))
    return out


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


@dataclass
class Figure:
    path_png: Path
    path_svg: Path
    title: str
    front: list[int]


def _wrap(line: str, width: int = FOOT_CHARS, indent: int = 2) -> list[str]:
    """One footnote entry wrapped (at ", " when it can), continuation lines indented past its
    `N: ` so a long config reads as one block instead of running off the right edge."""
    head, sep, _ = line.partition(": ")
    sub = " " * (indent + (len(head) + len(sep) if sep and len(head) < 8 else 2))
    return textwrap.wrap(line, width, initial_indent=" " * indent, subsequent_indent=sub,
                         break_long_words=True, break_on_hyphens=False) or [""]


def config_table(points: Sequence[Point], front: Sequence[Point], many: bool) -> list[str]:
    """The footnote's number -> config table: the front's configs, then (unless there are too many
    points to number) every other trial's, each wrapped."""
    fnums = {p.number for p in front}
    out = ["Front (red line):"]
    for p in sorted(front, key=lambda p: p.number):
        out += _wrap(f"{p.number}: {short_config(p.config)}")
    rest = sorted((p for p in points if p.number not in fnums), key=lambda p: p.number)
    if rest and not many:
        out.append("Other trials:")
        for p in rest:
            out += _wrap(f"{p.number}: {short_config(p.config)}")
    elif rest:
        out.append(f"Other trials ({len(rest)}, not numbered): see the study's points CSV.")
    return out


def _reference(pts: Sequence[Point], front: Sequence[Point], reference: int | None) -> Point | None:
    by_n = {p.number: p for p in pts}
    if reference in by_n:
        return by_n[reference]
    return front[len(front) // 2] if front else (pts[0] if pts else None)


def _bar_notes(perf: list[str], ref: Point | None, knee: int | None) -> list[str]:
    """The lines under the title: per performance objective, its bars' reference and absolute error."""
    sub = []
    for o in perf:
        a = absolute_text(o, ref) if ref else ""
        if a:
            sub.append(f"{_short(o).capitalize().replace('Ttft', 'TTFT')} bars: 90% between configs, relative to trial {ref.number}"
                       f"{' (knee)' if ref.number == knee else ''}. {a[0].upper() + a[1:]}")
    return sub


def _bar_footnote(perf: list[str], ref: Point) -> list[str]:
    """The footnote lines that say what the speed / TTFT error bars are."""
    return textwrap.wrap(
        f"{'/'.join(_short(o) for o in perf).capitalize().replace('Ttft', 'TTFT')} error bars: the 90% interval of each config's figure given trial {ref.number}'s, i.e. the error of the "
        "predicted ratio between two configs (engine.perf.calibrate.between_interval, fitted on the calibration's configs of "
        "one setting). The model's absolute error moves every config of the model on the device together: stated "
        "once above the plot, not drawn on each point.", FOOT_CHARS, subsequent_indent="  ")


def _scatter_points(ax, pts: Sequence[Point], xs: list, ys: list, fnums: set, noise: set) -> None:
    """The trials that are not on the front: infeasible, plain, within noise; allocated ones ringed."""
    bad = [i for i, p in enumerate(pts) if not p.feasible]
    if bad:
        ax.scatter([xs[i] for i in bad], [ys[i] for i in bad], s=26, marker="x", color="#888888", zorder=3,
                   label="infeasible (study constraint)")
    plain = [i for i, p in enumerate(pts) if p.feasible and p.number not in fnums and p.number not in noise]
    if plain:
        ax.scatter([xs[i] for i in plain], [ys[i] for i in plain], s=22, color=C_POINT, zorder=3, label="trial")
    nz = [i for i, p in enumerate(pts) if p.number in noise]
    if nz:
        ax.scatter([xs[i] for i in nz], [ys[i] for i in nz], s=30, facecolor="white", edgecolor=C_NOISE, linewidth=1.6,
                   zorder=4, label="within noise of the front")
    alloc = [i for i, p in enumerate(pts) if p.record.allocation]
    if alloc:
        ax.scatter([xs[i] for i in alloc], [ys[i] for i in alloc], s=70, marker="D", facecolor="none", edgecolor=C_ALLOC,
                   linewidth=1.6, zorder=6, label="allocated per layer (sweep allocate)")


def _pad_limits(ax, pts: Sequence[Point], x: str, y: str) -> None:
    # a little room so labels at the edges fit; a predicted speed/TTFT axis spans at least 2% of
    # its level, so differences far below the model's resolution do not fill the plot
    for obj, getter, setter in ((x, ax.get_xlim, ax.set_xlim), (y, ax.get_ylim, ax.set_ylim)):
        lo, hi = getter()
        if perf_metric(obj):
            vals = [p.value(obj) for p in pts]
            if vals:
                mid = (min(vals) + max(vals)) / 2
                need = 0.02 * abs(mid)
                if hi - lo < need:
                    lo, hi = mid - need / 2, mid + need / 2
        pad = (hi - lo) * 0.05 or 1.0
        setter(lo - pad, hi + pad)


def _legend_and_layout(fig, ax, n_foot: int, n_title: int, n_sub: int) -> None:
    """Size the figure for its title, legend and footnote lines, and place the axes and the legend."""
    # the legend goes under the axes, the number -> config table under it: nothing covers a point
    handles, names = ax.get_legend_handles_labels()
    ncol = 3 if sum(len(n) for n in names) < 150 else 2
    legend_h = 0.19 * math.ceil(len(names) / ncol) + 0.12
    foot_h = 0.13 * n_foot + 0.08  # inches of footnote (7.5 pt monospace lines)
    top_h = 0.3 + 0.19 * n_title + 0.15 * n_sub  # inches above the axes
    fig_h = 4.6 + legend_h + foot_h + top_h
    fig.set_size_inches(9.0, fig_h)
    bottom = (foot_h + legend_h + 0.5) / fig_h
    ax.set_position([0.09, bottom, 0.88, 1 - bottom - top_h / fig_h])
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.53, (foot_h + legend_h + 0.02) / fig_h),
               ncol=ncol, fontsize=8, frameon=False, handletextpad=0.4, columnspacing=1.6)


def front_figure(points: Sequence[Point], x: str, y: str, title: str, *, noise: Sequence[int] = (),
                 knee: int | None = None, footer: str = "", reference: int | None = None):
    """The figure of `plot_front` (matplotlib Figure, Agg canvas) and its front. Speed / TTFT error
    bars are relative to trial `reference` (default: the knee, else the front's middle point)."""
    pts = _usable(points, [x, y])
    front = front_2d(pts, x, y)
    fnums = {p.number for p in front}
    noise = set(noise) - fnums
    many = len(pts) > MAX_NUMBERED
    perf = [o for o in (x, y) if perf_metric(o)]
    ref = _reference(pts, front, reference if reference is not None else knee) if perf else None
    sub = _bar_notes(perf, ref, knee)
    foot = config_table(pts, front, many)
    if sub:
        foot += _bar_footnote(perf, ref)
    if footer:
        foot += textwrap.wrap(footer, FOOT_CHARS, subsequent_indent="  ")
    title_lines = textwrap.wrap(title, 92) or [""]
    sub_lines = [w for t in sub for w in textwrap.wrap(t, 125)]
    fig = MplFigure(figsize=(9.0, 6.0), dpi=110)  # Agg canvas, no pyplot: no global backend state
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.09, 0.2, 0.88, 0.7])  # placed below, once the legend's size is known
    xs = [p.value(x) for p in pts]
    ys = [p.value(y) for p in pts]
    xerr, yerr = _err(pts, x, ref), _err(pts, y, ref)
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="#9aa7b8", elinewidth=0.8, capsize=0 if many else 2,
                alpha=0.35 if many else 1.0, zorder=1,
                label=_err_label(x, y, xerr, yerr, ref))
    _scatter_points(ax, pts, xs, ys, fnums, noise)
    fx = [p.value(x) for p in front]
    fy = [p.value(y) for p in front]
    ax.plot(fx, fy, "-", color=C_FRONT, linewidth=1.6, zorder=2)
    ax.scatter(fx, fy, s=34, color=C_FRONT, zorder=5, label="Pareto front")
    rings = []
    if knee is not None and knee in fnums:
        k = next(p for p in front if p.number == knee)
        rings.append((k.value(x), k.value(y), 9))
        ax.scatter([k.value(x)], [k.value(y)], s=170, facecolor="none", edgecolor=C_KNEE, linewidth=1.8, zorder=5,
                   label="knee")
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.set_title("\n".join(title_lines), fontsize=10.5, pad=6 + 10.5 * len(sub_lines))
    if sub_lines:
        ax.annotate("\n".join(sub_lines), (0.5, 1.0), xycoords="axes fraction", xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8, color="#444444")
    ax.grid(True, alpha=0.3)
    _pad_limits(ax, pts, x, y)
    ax.ticklabel_format(useOffset=False, style="plain")
    _legend_and_layout(fig, ax, len(foot), len(title_lines), len(sub_lines))
    numbered = [i for i, p in enumerate(pts) if not many or p.number in fnums]
    _place_labels(ax, fig, [xs[i] for i in numbered], [ys[i] for i in numbered],
                  [str(pts[i].number) for i in numbered],
                  [C_FRONT if pts[i].number in fnums else "#222222" for i in numbered], rings, [(fx, fy)])
    fig.text(0.02, 0.012, "\n".join(foot), fontsize=7.5, family="monospace", va="bottom", ha="left")
    return fig, front


def plot_front(points: Sequence[Point], x: str, y: str, path: Path, title: str, *, noise: Sequence[int] = (),
               knee: int | None = None, footer: str = "", reference: int | None = None) -> Figure:
    """Scatter of y against x, points numbered by trial, the 2-D front as a red line, error bars
    (Wilson for accuracy, between-config for speed / TTFT: see the module docstring), and a
    footnote table mapping numbers to config diffs. Writes `path`.png and `path`.svg."""
    fig, front = front_figure(points, x, y, title, noise=noise, knee=knee, footer=footer, reference=reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, svg = path.with_suffix(".png"), path.with_suffix(".svg")
    save_figure(fig, png, svg)
    return Figure(png, svg, title, [p.number for p in front])


@dataclass
class PlotResult:
    images: list[Path] = field(default_factory=list)
    index: Path | None = None
    figures: list[Figure] = field(default_factory=list)


def write_plots(analysis: Analysis, out: str | Path) -> PlotResult:
    """All plots of a study under `out/<study>/` and the index page `out/<study>/index.md`
    (plus `out/index.md` linking every study's index)."""
    out = Path(out)
    sdir = out / _slug(analysis.info.name)
    res = PlotResult()
    models = sorted({p.record.model for p in analysis.points})
    calib = calibration_text(analysis)
    speed_note = f"Speed/TTFT: performance-model predictions, not measurements. Source: {calib.rstrip('. ')}."
    sections = []
    for model in models:
        pts = [p for p in analysis.points if p.record.model == model]
        name = display_name(model)
        ntr = f"{len(pts)} trial{'s' if len(pts) != 1 else ''}"
        figs = []
        for dev in analysis.info.devices:
            df = analysis.devices.get(dev)
            noise = df.within_noise if df else ()
            knee = df.knee if df else None
            f1 = plot_front(pts, "top1", f"speed:{dev}", sdir / f"{_slug(model)}_{dev}_speed_vs_top1",
                            f"{name} on {dev}: Speed vs Top-1 ({analysis.info.name}, {ntr})",
                            noise=noise, knee=knee,
                            footer=speed_note + (f" Hollow orange: within noise of the front ({df.noise_rule})." if df else ""))
            f2 = plot_front(pts, "top1", f"ttft:{dev}", sdir / f"{_slug(model)}_{dev}_ttft_vs_top1",
                            f"{name} on {dev}: TTFT vs Top-1 ({analysis.info.name}, {ntr})",
                            footer=speed_note, reference=knee)
            figs += [(dev, f1), (dev, f2)]
        f3 = plot_front(pts, "top5", "top1", sdir / f"{_slug(model)}_top1_vs_top5",
                        f"{name}: Top-1 vs Top-5 ({analysis.info.name}, {ntr}; any device)")
        figs.append((None, f3))
        for _, f in figs:
            res.images += [f.path_png, f.path_svg]
            res.figures.append(f)
        sections.append((model, figs))
    res.index = write_index(analysis, sdir, sections)
    _write_top_index(out)
    return res


def _fmt(x, nd=1):
    return "" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def front_table(analysis: Analysis, device: str) -> list[str]:
    df = analysis.devices[device]
    lines = ["| # | Top-1 (%) [95% CI] | Top-5 (%) | Speed (t/s/u) | TTFT (ms) | config (diff from defaults) |",
             "|---|---|---|---|---|---|"]
    for n in df.front:
        p = analysis.point(n)
        r = p.record
        mark = " (knee)" if n == df.knee else ""
        lines.append(f"| {n}{mark} | {r.top1:.1f} [{r.top1_ci[0]:.1f}, {r.top1_ci[1]:.1f}] | {r.top5:.1f} | "
                     f"{_fmt(r.speed.get(device))} | {_fmt(r.ttft.get(device), 0)} | `{short_config(p.config)}` |")
    return lines


def plots_short(config: str) -> str:
    return short_config(config) if config else "?"


def write_index(analysis: Analysis, sdir: Path, sections) -> Path:
    info = analysis.info
    lines = [f"# Study {info.name}: fronts", ""]
    lines.append(f"Model {display_name(info.model)} (`{info.model}`), devices {', '.join(info.devices)}, "
                 f"{len(analysis.points)} COMPLETE trials. Points are numbered by trial number (same as the CSV "
                 f"and the front export).")
    lines.append("")
    lines.append(f"Speed and TTFT are performance-model predictions, not measurements ({calibration_text(analysis)}). "
                 "Accuracy error bars are 95% Wilson intervals.")
    lines.append("")
    lines += [between_text(), ""]
    lines.append(f"Front over all study objectives ({', '.join(info.objectives)}): trials "
                 f"{', '.join(map(str, analysis.front)) or 'none'}; knee {analysis.knee}; hypervolume "
                 f"{analysis.hypervolume:.6g} with reference point ({analysis.reference_text()}).")
    lines.append("")
    infeasible = [p.number for p in analysis.points if not p.feasible]
    if infeasible:
        lines += [f"Infeasible under the study's constraints (drawn as x, never on a front): trials "
                  f"{', '.join(map(str, infeasible))}.", ""]
    if info.skipped:
        lines += [f"{len(info.skipped)} grid config(s) were not run: equal in numerics to a config that is no slower "
                  "(same accuracy), so dominated a priori:", ""]
        lines += [f"- `{plots_short(s.get('config', ''))}` = `{plots_short(s.get('same_as', ''))}`" for s in info.skipped]
        lines.append("")
    for model, figs in sections:
        lines += [f"## {display_name(model)}", ""]
        for dev in info.devices:
            if dev not in analysis.devices:
                continue
            df = analysis.devices[dev]
            lines += [f"### {dev}: Top-1 / speed front", ""]
            lines += front_table(analysis, dev)
            lines += ["", f"Within noise of the front ({df.noise_rule}): "
                      f"{', '.join(map(str, df.within_noise)) or 'none'}. Knee: {df.knee}. Hypervolume "
                      f"{df.hypervolume:.5g} with reference point (Top-1 {df.reference[0]:.2f} %, speed "
                      f"{df.reference[1]:.2f} t/s/u)." if df.reference else "", ""]
            for d, f in figs:
                if d == dev:
                    lines += [f"![{f.title}]({f.path_png.name})", "", f"[SVG]({f.path_svg.name})", ""]
        for d, f in figs:
            if d is None:
                lines += ["### Top-1 vs Top-5", "", f"![{f.title}]({f.path_png.name})", "", f"[SVG]({f.path_svg.name})", ""]
    path = sdir / "index.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


def between_text() -> str:
    """The index page's paragraph on the speed / TTFT error bars, with the fitted figures."""
    from engine.perf.calibrate import between_terms

    s, t = between_terms("speed"), between_terms("ttft")
    if s is None or t is None:
        return "Speed and TTFT carry no error bars: the performance model has no calibration."
    fig = lambda m, x: (f"{100 * x['a']:.1f}% + {x['b']:.2f} x the predicted difference ({x['pairs']} pairs, "
                        f"{100 * x['coverage']:.0f}% inside)")
    return ("Speed and TTFT error bars are between-config intervals: the 90% interval of each config's figure "
            "given the reference trial's (the device's knee; no bar on it), i.e. the error of the predicted ratio "
            "between two configs of one model on one device, which is what choosing among them depends on. Their "
            "half-width comes from the calibration rows that differ only in config (same model, device and run "
            f"settings): speed {fig('speed', s)}, TTFT {fig('ttft', t)} "
            "(engine.perf.calibrate.between_interval, a 90% quantile regression in engine.perf.calibrate.between_config_fit). The "
            "model's absolute error (its 90% prediction interval) is mostly an offset common to all configs of the "
            "model on the device: each plot states it once, above the axes, instead of drawing it on every point.")


def _write_top_index(out: Path) -> Path:
    studies = sorted(p.parent.name for p in out.glob("*/index.md"))
    lines = ["# Pareto plots", "", "One page per study (written by `sweep pareto`):", ""]
    lines += [f"- [{s}]({s}/index.md)" for s in studies]
    path = out / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["Figure", "PlotResult", "front_figure", "front_table", "plot_front", "plot_profile", "profile_figure", "save_figure",
           "short_config", "write_index", "write_plots"]


def profile_figure(profile, title: str, column: str = "d_kld"):
    """The heatmap of `plot_profile` as a matplotlib Figure (Agg canvas), sized from the number of
    layers and columns so it works at any size: 0.22 in per layer row, 0.34 in per column, a
    minimum width that keeps the title (wrapped to it) and the colour bar inside, column labels
    rotated upright, every k-th layer labelled when rows get too thin for a label each, constrained
    layout placing title, labels and colour bar without overlap."""
    import numpy as np
    from matplotlib.colors import SymLogNorm
    from matplotlib.ticker import FixedLocator

    probes = profile[profile["layer"] >= 0]
    cols = list(dict.fromkeys(f"{r.family}={r.choice}" for r in probes.itertuples()))
    layers = sorted({int(v) for v in probes["layer"]})
    grid = np.full((len(layers), len(cols)), np.nan)
    for r in probes.itertuples():
        grid[layers.index(int(r.layer)), cols.index(f"{r.family}={r.choice}")] = getattr(r, column)
    vmax = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    longest = max((len(c) for c in cols), default=4)
    width = max(5.2, 1.5 + 0.34 * len(cols) + 1.3)  # y label + ticks, the cells, the colour bar
    title_lines = textwrap.wrap(title, max(30, int((width - 0.3) * 72 / 5.6)))  # ~5.6 pt a char at 10 pt
    height = (0.45 + 0.2 * len(title_lines)) + min(0.22 * len(layers), 30.0) + 0.35 + 0.065 * longest  # + labels
    fig = MplFigure(figsize=(width, max(3.0, height)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    linthresh = max(vmax * 1e-3, 1e-6)
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                   norm=SymLogNorm(linthresh=linthresh, vmin=-vmax, vmax=vmax, base=10))
    ax.set_xticks(range(len(cols)), cols, rotation=90, ha="center", va="top", fontsize=7.5)  # upright: never touch
    row_pt = 72 * min(0.22 * len(layers), 30.0) / max(1, len(layers))  # points per layer row
    step = max(1, math.ceil(9.0 / row_pt))  # a 7 pt label needs about 9 pt of height
    shown = list(range(0, len(layers), step))
    ax.set_yticks(shown, [str(layers[i]) for i in shown], fontsize=7)
    ax.set_ylabel("decoder layer")
    ax.set_title("\n".join(title_lines), fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02, aspect=30)
    # colour-bar ticks: 0 and the decades above the linear range, both signs (no crowding at 0)
    top = math.floor(math.log10(vmax))
    decades = [10.0 ** k for k in range(top - 2, top + 1) if 10.0 ** k > linthresh * 3]
    ticks = sorted([-d for d in decades] + [0.0] + decades)
    cb.ax.yaxis.set_major_locator(FixedLocator(ticks))
    cb.ax.yaxis.set_minor_locator(FixedLocator([]))
    cb.ax.set_yticklabels([("0" if t == 0 else f"{t:.0e}".replace("e-0", "e-").replace("e+0", "e")) for t in ticks],
                          fontsize=7)
    cb.set_label("delta KLD vs base (nats)" if column == "d_kld" else column, fontsize=8)
    return fig


def plot_profile(profile, path: Path, title: str, column: str = "d_kld") -> Path:
    """A sensitivity profile as a layers x (family=choice) heatmap of `column` (delta-KLD, nats;
    symmetric-log colours: red hurts, blue helps); `profile_figure` sizes it. PNG (deterministic:
    no Software chunk); returns its path."""
    fig = profile_figure(profile, title, column)
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, png=path)
    return path
