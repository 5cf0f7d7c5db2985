"""Front plots and the index page (sweep.plots, sweep pareto)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from synthetic_study import build_study, journal_storage, lt_pareto_configs, synthetic_record  # noqa: E402

from engine.vocab.config import DEFAULT  # noqa: E402
from sweep import cli, pareto, plots  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_short_config():
    assert plots.short_config(str(DEFAULT)) == "defaults"
    cfg = DEFAULT.replace(ff1_3="bfp4", li_ff1_3="lofi")
    assert plots.short_config(str(cfg)) == "ff1_3: bfp4, li_ff1_3: lofi"


def test_write_plots(tmp_path):
    a = pareto.analyze(build_study())
    res = plots.write_plots(a, tmp_path)
    sdir = tmp_path / "lt-pareto"
    expect = [f"smollm2-135m_{d}_{k}_vs_top1" for d in ("N300", "N150") for k in ("speed", "ttft")]
    expect.append("smollm2-135m_top1_vs_top5")
    for stem in expect:
        png, svg = sdir / f"{stem}.png", sdir / f"{stem}.svg"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
        assert "<svg" in svg.read_text()[:2000]
    assert len(res.images) == 2 * len(expect)
    # the speed plots draw each device's Top-1/speed front
    for f in res.figures:
        if "speed_vs_top1" in f.path_png.name:
            dev = f.path_png.name.split("_")[1]
            assert sorted(f.front) == sorted(a.devices[dev].front)
    index = res.index.read_text()
    for stem in expect:
        assert f"({stem}.png)" in index and f"({stem}.svg)" in index
    for dev, df in a.devices.items():
        assert f"### {dev}: Top-1 / speed front" in index
        for n in df.front:
            assert f"\n| {n}" in index
    assert "reference point" in index and "not measurements" in index
    assert "(lt-pareto/index.md)" in (tmp_path / "index.md").read_text()


def test_plots_of_one_point_and_of_many(tmp_path):
    one = pareto.analyze(build_study(configs=[DEFAULT], name="one"))
    plots.write_plots(one, tmp_path)
    assert (tmp_path / "one" / "smollm2-135m_N150_speed_vs_top1.png").exists()
    # 120 points: only front and within-noise points are numbered, and it stays quick
    base = lt_pareto_configs()
    recs = []
    for i in range(120):
        r = synthetic_record(base[i % 12], i)
        r.top1 -= (i % 7) * 0.3
        r.speed = {d: v * (1 + (i % 11) * 0.01) for d, v in r.speed.items()}
        recs.append(r)
    many = pareto.analyze(build_study(configs=[], extra_records=recs, name="many"))
    res = plots.write_plots(many, tmp_path)
    assert len(res.images) == 10


def test_cli_pareto(tmp_path, capsys):
    log = tmp_path / "lt.log"
    build_study(storage=journal_storage(log))
    out = tmp_path / "plots"
    assert cli.main(["pareto", str(log), "--out", str(out)]) == 0
    assert (out / "lt-pareto" / "index.md").exists()
    assert "front = trials" in capsys.readouterr().out


def test_labels_do_not_overlap_and_stacked_points_share_one_label():
    """The Top-1 vs Top-5 case: several points at Top-5 = 100 a fraction of a point apart (markers on
    top of each other) and a tight column of distinct points: one label per blob, none overlapping."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [100.0, 100.0, 100.0, 100.0, 100.0, 99.8, 99.8, 99.6, 95.3] + [97.0] * 6
    ys = [95.1, 93.9, 93.7, 93.5, 93.3, 88.1, 87.7, 88.5, 69.5] + [75.0 + 0.9 * i for i in range(6)]
    texts = ["4", "8", "12", "7", "5", "9", "11", "10", "0"] + [f"c{i}" for i in range(6)]
    ax.scatter(xs, ys)
    ax.set_xlim(92.5, 100.7)
    ax.set_ylim(62, 99)
    boxes = plots._place_labels(ax, fig, xs, ys, texts, ["#d62728"] + ["#222222"] * (len(xs) - 1))
    labels = [t.get_text() for t in ax.texts]
    assert "8, 12, 7, 5" in labels  # the four stacked markers, top to bottom
    assert "4" in labels and "0" in labels and all(f"c{i}" in labels for i in range(6))
    assert len(boxes) == len(labels)
    for i in range(len(boxes)):
        for j in range(i):
            assert plots._overlap(boxes[i], boxes[j]) == 0, (labels[i], labels[j])


# --- deterministic files -------------------------------------------------------------------------
def _profile_frame(layers: int, cols: list[tuple[str, str]]):
    import math as m

    import pandas as pd

    rows = [{"layer": -1, "family": "base", "choice": "base", "d_kld": 0.0}]
    for L in range(layers):
        for k, (f, c) in enumerate(cols):
            rows.append({"layer": L, "family": f, "choice": c, "d_kld": 0.02 * m.sin(0.7 * L + k) ** 3})
    return pd.DataFrame(rows)


def test_plots_are_the_same_bytes_on_every_render(tmp_path):
    """Two renders of one study (and of one heatmap) write identical files: no SVG date, no
    random clip-path ids, no version strings in the PNG/SVG metadata."""
    a = pareto.analyze(build_study())
    r1 = plots.write_plots(a, tmp_path / "one")
    r2 = plots.write_plots(a, tmp_path / "two")
    assert len(r1.images) == len(r2.images) == 10
    for p1, p2 in zip(r1.images, r2.images):
        assert p1.read_bytes() == p2.read_bytes(), p1.name
        if p1.suffix == ".svg":
            text = p1.read_text()
            assert "<dc:date>" not in text and "Matplotlib v" not in text
            assert 'clip-path="url(#p' in text  # ids are there, and equal between the renders
        else:
            assert b"Software" not in p1.read_bytes()[:4096] and b"tEXt" not in p1.read_bytes()[:4096]
    prof = _profile_frame(6, [("ff1_3", "bfp4"), ("wo", "bfp4")])
    h1 = plots.plot_profile(prof, tmp_path / "h1", "title")
    h2 = plots.plot_profile(prof, tmp_path / "h2", "title")
    assert h1.read_bytes() == h2.read_bytes()


# --- the heatmap at any size ---------------------------------------------------------------------
def _boxes(fig, texts):
    r = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(r)) for t in texts if t.get_visible() and t.get_text()]


def _assert_apart(boxes):
    for i in range(len(boxes)):
        for j in range(i):
            (ta, a), (tb, b) = boxes[i], boxes[j]
            assert not a.overlaps(b), f"tick labels {ta!r} and {tb!r} overlap"


def _assert_inside(fig, boxes):
    w, h = fig.canvas.get_width_height()
    for t, b in boxes:
        assert b.x0 >= -0.5 and b.y0 >= -0.5 and b.x1 <= w + 0.5 and b.y1 <= h + 0.5, f"{t!r} leaves the figure"


FAMILIES = [("ff1_3", "bfp4"), ("ff1_3", "bf16"), ("ff2", "bfp4"), ("ff2", "bf16"), ("wqkv", "bfp4"), ("wqkv", "bf16"),
            ("wo", "bfp4"), ("wo", "bf16"), ("kv_cache", "bfp4"), ("kv_cache", "bf16"), ("activation", "bf16"),
            ("activation", "bfp8"), ("sdpa_decode", "lofi"), ("sdpa_decode", "hifi4"), ("sdpa_prefill", "lofi"),
            ("sdpa_prefill", "hifi2")]


def test_heatmap_works_at_any_size():
    """One family, two families (the case whose title was clipped and ticks overlapped), the
    full 16 columns, 80 and 200 layers: tick labels (both axes and the colour bar) never overlap,
    and the title and every label stay inside the figure."""
    title = "SmolLM2-135M: delta KLD of one change to defaults (128+127 tokens)"
    for layers, cols in ((30, FAMILIES[:1]), (30, [FAMILIES[0], FAMILIES[8]]), (30, FAMILIES[:4]), (30, FAMILIES),
                         (80, FAMILIES[:4]), (200, FAMILIES[:2]), (3, FAMILIES)):
        fig = plots.profile_figure(_profile_frame(layers, cols), title)
        fig.canvas.draw()
        ax, cax = fig.axes[0], fig.axes[1]
        xt, yt, ct = (_boxes(fig, ax.get_xticklabels()), _boxes(fig, ax.get_yticklabels()),
                      _boxes(fig, cax.get_yticklabels()))
        assert len(xt) == len(cols) and len(yt) >= min(layers, 10) and len(ct) >= 3
        for boxes in (xt, yt, ct):
            _assert_apart(boxes)
            _assert_inside(fig, boxes)
        tb = _boxes(fig, [ax.title])
        _assert_inside(fig, tb)
        assert tb[0][0].replace("\n", " ") == title


# --- speed bars: between configs, the absolute error once ----------------------------------------
def test_speed_bars_are_the_between_config_interval_and_smaller_than_the_absolute():
    """On the committed lt-pareto results: each speed bar is engine.perf.model.between_interval of the
    point against the knee (nil for the knee itself), every one narrower than the absolute 90%
    prediction interval (what the bars used to be), which the plot states once, above the axes."""
    from committed_points import committed_analysis  # noqa: E402  (test fixture)
    from matplotlib.collections import LineCollection

    from engine.perf.calibrate import between_interval
    from engine.perf.model import interval

    a = committed_analysis()
    knee = a.devices["N150"].knee
    ref = a.point(knee)
    pts = [p for p in a.points if p.feasible]
    for obj in ("speed:N150", "ttft:N150"):
        fig, _ = plots.front_figure(pts, "top1", obj, "t", knee=knee)
        ax = fig.axes[0]
        vertical = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()
                    if len(s) == 2 and s[0][0] == s[1][0] and s[0][1] != s[1][1]]
        metric = obj.split(":")[0]
        widths = {}
        for p in pts:
            v, r0 = p.value(obj), ref.value(obj)
            lo, hi = between_interval(metric, v, r0, "N150", p.record.model) if p.number != knee else (v, v)
            alo, ahi, _ = interval(metric, v, "N150", p.record.model)
            assert hi - lo < 0.75 * (ahi - alo), (p.number, obj)
            widths[p.number] = hi - lo
            if p.number != knee:
                assert any(abs(s[0][1] - lo) < 1e-6 and abs(s[1][1] - hi) < 1e-6 for s in vertical), (p.number, obj)
        assert widths[knee] == 0
        head = " ".join(t.get_text() for t in ax.texts if "Absolute error" in t.get_text())
        alo, ahi, _ = interval(metric, ref.value(obj), "N150", ref.record.model)
        nd = 0 if metric == "ttft" else 1
        assert f"-{ref.value(obj) - alo:.{nd}f}/+{ahi - ref.value(obj):.{nd}f}" in head
        assert not any(abs((s[1][1] - s[0][1]) - (ahi - alo)) < 1e-6 for s in vertical)  # no absolute bar per point
        # the numbers next to the points do not overlap one another
        fig.canvas.draw()
        nums = _boxes(fig, [t for t in ax.texts if "Absolute error" not in t.get_text()])
        assert len(nums) >= 10
        _assert_apart(nums)


def test_page_bars_are_the_plots_between_config_intervals():
    from committed_points import committed_analysis  # noqa: E402  (test fixture)

    from engine.perf.model import interval
    from sweep.html import page_data

    a = committed_analysis()
    knee = a.devices["N150"].knee
    data = page_data(a)
    assert "between-config" in data["bars_note"] and "absolute error" in data["bars_note"]
    for p in data["points"]:
        for k in ("speed", "ttft"):
            lo, hi = p[f"{k}_ci"]["N150"]
            alo, ahi, _ = interval(k, p[k]["N150"], "N150", a.info.model)
            assert (hi - lo == 0) if p["n"] == knee else (0 < hi - lo < ahi - alo)
            assert list(plots._ci(a.point(p["n"]), f"{k}:N150", a.point(knee))) == [lo, hi]


def test_between_config_fit_recovers_a_known_line_and_widens_off_the_calibration():
    from engine.perf.calibrate import between_config_fit, between_interval, between_terms

    # errors 0.02 + (0.1 .. 0.5) x the difference, evenly: the 80% line is 0.02 + 0.4 d
    pairs = [(d / 100, 0.02 + d / 100 * f) for d in range(1, 101) for f in (0.1, 0.2, 0.3, 0.4, 0.5)]
    t = between_config_fit(pairs, level=0.8)
    assert t["a"] == pytest.approx(0.02, abs=1e-9) and t["b"] == pytest.approx(0.4, abs=1e-9)
    assert t["pairs"] == 500 and t["coverage"] >= 0.8
    s = between_terms("speed")
    assert s["pairs"] >= 20 and 0 < s["a"] < 0.1 and 0 <= s["b"] < 1.5
    assert between_interval("speed", 120.0, 120.0, "N150", "smollm2-135m") == pytest.approx(
        (120 * math.exp(-s["a"]), 120 * math.exp(s["a"])))
    near = between_interval("speed", 120.0, 124.0, "N150", "smollm2-135m")
    far = between_interval("speed", 120.0, 150.0, "N150", "smollm2-135m")
    assert far[1] - far[0] > near[1] - near[0]  # a larger predicted difference is less certain
    tg = between_interval("speed", 120.0, 124.0, "TG", "smollm2-135m")
    assert tg[1] - tg[0] > near[1] - near[0]  # off the calibrated systems it widens like `interval`


# --- readable labels -----------------------------------------------------------------------------
def test_long_configs_wrap_inside_the_figure_and_every_trial_has_its_config():
    """The footnote table lists every numbered trial's config, wrapped, never cut at the right edge."""
    a = pareto.analyze(build_study())
    pts = a.points
    long = max(pts, key=lambda p: len(plots.short_config(p.config)))
    fig, front = plots.front_figure(pts, "top1", "speed:N150", "a title " * 20, knee=a.devices["N150"].knee)
    fig.canvas.draw()
    _assert_inside(fig, _boxes(fig, fig.texts + fig.axes[0].texts + [fig.axes[0].title]))
    foot = next(t.get_text() for t in fig.texts if t.get_text().startswith("Front"))
    flat = " ".join(foot.split())
    for p in pts:
        assert f"{p.number}: {' '.join(plots.short_config(p.config).split())}" in flat
    assert len(plots.short_config(long.config)) < 128 or any(len(line) <= 128 for line in foot.splitlines())
    assert all(len(line) <= plots.FOOT_CHARS for line in foot.splitlines())
    # the legend sits under the axes: it covers no point
    leg = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    assert leg.y1 < fig.axes[0].get_window_extent(fig.canvas.get_renderer()).y0
