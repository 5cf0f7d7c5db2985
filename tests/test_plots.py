"""Front plots and the index page (sweep.plots, sweep pareto)."""
from __future__ import annotations

import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent / "data"))
from synthetic_study import build_study, journal_storage, lt_pareto_configs, synthetic_record  # noqa: E402

from engine.config import DEFAULT  # noqa: E402
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
