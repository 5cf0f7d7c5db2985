"""Seed-format report, section ownership, CSV, front export and the regression check (sweep.report)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from synthetic_study import MODEL, N_LAYERS, build_study, journal_storage, lt_pareto_configs, synthetic_record  # noqa: E402  (test fixture)

from engine.vocab.config import DEFAULT, Config, ModelConfig, performance  # noqa: E402
from sweep import cli, pareto, report  # noqa: E402
from sweep.report import check as report_check  # noqa: E402  (sweep check: its default_evaluator)

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
SEED = (ROOT / "reference" / "PERF-seed.md").read_text()


def seed_config_headers() -> list[str]:
    return [b.header for b in report.sections(SEED) if b.header.startswith("precision_cfg")]


def build_report(study, existing=None, configs="all"):
    return report.update_report(existing, report.build_sections(pareto.analyze(study), configs))


# --- the seed's structure -------------------------------------------------------------------------
def test_lt_pareto_headers_equal_the_seed():
    text = build_report(build_study())
    ours = [b.header for b in report.sections(text) if b.header.startswith("precision_cfg")]
    assert len(ours) == 12
    assert ours == seed_config_headers()
    # and as raw lines, character for character
    assert [f"## {h}" for h in ours] == [ln for ln in SEED.splitlines() if ln.startswith("## precision_cfg")]


def test_lt_pareto_spec_headers_equal_the_seed():
    """The shipped study file: the runner's grid (file order, nothing skipped), recorded as trials,
    gives a report whose 12 config headers are the seed's."""
    spec_path = ROOT / "studies" / "lt-pareto.toml"
    space = pytest.importorskip("sweep.space")
    if not spec_path.exists():
        pytest.skip("studies/lt-pareto.toml not there")
    spec = space.load_spec(spec_path)
    configs = [mc for _, mc in spec.space.grid()]
    assert all(mc.is_uniform for mc in configs)
    study = build_study(model=spec.model, configs=[mc.base for mc in configs], devices=spec.devices,
                        objectives=spec.objectives, space=spec.to_dict()["space"])
    text = build_report(study)
    assert [b.header for b in report.sections(text) if b.header.startswith("precision_cfg")] == seed_config_headers()
    # configs listed by preset name (the accuracy preset) get only their preset section
    headers = [b.header for b in report.sections(text)]
    assert headers[:2] == ["Performance", "Accuracy"]


def test_configs_listed_by_preset_name_get_only_their_preset_section():
    from engine.vocab.config import accuracy

    acc = accuracy(MODEL)
    by_name = build_study(configs=[DEFAULT, acc], space={"base": "defaults", "configs": ["defaults", "accuracy"]})
    headers = [b.header for b in report.sections(build_report(by_name))]
    assert headers == ["Accuracy", str(DEFAULT)]
    as_string = build_study(configs=[DEFAULT, acc], space={"base": "defaults", "configs": ["defaults", acc.diff()]})
    headers = [b.header for b in report.sections(build_report(as_string))]
    assert headers == ["Accuracy", str(DEFAULT), str(acc)]


def test_sections_in_order_and_presets_only_when_measured():
    text = build_report(build_study())
    heads = [b.header for b in report.sections(text)]
    # lt-pareto holds the performance preset (config 2) but not SmolLM2's accuracy preset
    assert heads[0] == "Performance" and "Accuracy" not in heads
    assert heads[1:] == [str(c) for c in lt_pareto_configs()]
    perf = report.find_section(text, "Performance")
    rows = perf.table().rows
    assert [r[:2] for r in rows] == [["SmolLM2-135M", "N300"], ["SmolLM2-135M", "N150"]]
    assert str(performance("smollm2-135m")) in perf.notes()["SmolLM2-135M"]


def test_accuracy_section_when_the_study_measured_it():
    from engine.vocab.config import accuracy

    cfgs = [performance("llama3.2-1b"), accuracy("llama3.2-1b"), DEFAULT.replace(wo="bfp4")]
    text = build_report(build_study(model="llama3.2-1b", configs=cfgs))
    heads = [b.header for b in report.sections(text)]
    assert heads == ["Performance", "Accuracy"] + [str(c) for c in cfgs]


def test_row_number_style_matches_the_seed():
    rec = synthetic_record(lt_pareto_configs()[0], 0, model="llama3.2-1b", devices=["N300"])
    rec.top1, rec.top5, rec.speed, rec.ttft = 85.2, 97.5, {"N300": 100.25}, {"N300": 68.5}
    p = pareto.Point(0, rec)
    lines = report.table_lines(report.rows_for(p, ["N300"]))
    seed_table = [ln for ln in SEED.splitlines() if ln.startswith("|")]
    assert lines[0].rstrip("\n") in seed_table and lines[1].rstrip("\n") in seed_table
    assert lines[2].rstrip("\n") == "| Llama3.2-1B    | N300   | 85        | 98        | 100.3         | 69        |"


def test_number_style():
    assert report.fmt_percent(88.5) == "89" and report.fmt_percent(88.49) == "88"
    assert report.fmt_speed(99.95) == "100.0" and report.fmt_speed(95.24) == "95.2"
    assert report.fmt_ms(None) == "" and report.fmt_ms(49.5) == "50"


def test_every_table_carries_a_speed_provenance_line():
    text = build_report(build_study())
    for b in report.sections(text):
        note = b.notes()["SmolLM2-135M"]
        assert "performance-model predictions, not measurements" in note
        assert "synthetic test fixture" in note  # the study's perf_calibration
        assert report.accuracy_settings(b, "SmolLM2-135M") == {"prefill": 512, "decode": 511, "windows": 1}


def test_eval_settings_come_from_the_spec():
    study = build_study()
    study.set_user_attr("spec", {"eval": {"prefill": 256, "decode": 255}})
    text = build_report(study)
    assert report.accuracy_settings(report.sections(text)[0], "SmolLM2-135M") == {"prefill": 256, "decode": 255, "windows": 1}


def test_markdown_round_trip():
    assert report.render_markdown(report.parse_markdown(SEED)) == SEED
    assert report.find_section(SEED, "PERFORMANCE").header == "Performance"
    assert report.find_section(SEED, "long-context (64k tokens)") is not None


# --- regeneration ----------------------------------------------------------------------------------
def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_regenerating_over_the_seed_keeps_foreign_sections_and_rows():
    study = build_study()
    once = build_report(study, SEED)
    # every line of the seed survives, in order (Llama rows, long-context tables, prose)
    assert _is_subsequence(SEED.splitlines(), once.splitlines())
    # our rows joined the seed's 12 config sections instead of duplicating them
    assert [b.header for b in report.sections(once)] == [b.header for b in report.sections(SEED)]
    sec = report.find_section(once, seed_config_headers()[0])
    assert [r[0] for r in sec.table().rows] == ["Llama3.2-1B", "SmolLM2-135M", "SmolLM2-135M"]
    # the Performance table keeps the seed's column widths
    perf = report.find_section(once, "Performance")
    assert "| SmolLM2-135M             | N300        |" in "".join(perf.lines)  # the seed's Device column (T3K  (DP=4))
    # regenerating is idempotent
    assert build_report(study, once) == once


def test_regenerating_replaces_only_this_models_rows():
    a = build_study(name="a")
    first = build_report(a)
    other = build_report(build_study(model="tiny-llama", name="b"), first)
    # new numbers for SmolLM2 in a second study
    recs = [synthetic_record(c, i) for i, c in enumerate(lt_pareto_configs())]
    for r in recs:
        r.top1 = 50.0
    c = build_study(name="c", configs=[], extra_records=recs)
    again = build_report(c, other)
    for b in report.sections(again):
        rows = b.table().rows
        smol = [r for r in rows if r[0] == "SmolLM2-135M"]
        tiny = [r for r in rows if r[0] == "tiny-llama"]
        assert len(smol) == 2 and all(r[2] == "50" for r in smol)
        assert len(tiny) == 2 and all(r[2] != "50" for r in tiny)
        assert set(b.notes()) == {"SmolLM2-135M", "tiny-llama"}
        assert "Study c," in b.notes()["SmolLM2-135M"]


def test_new_sections_land_after_existing_ones_of_their_kind():
    foreign = "# Title\n\n## Long-context (64K Tokens)\n\nsome prose\n"
    text = build_report(build_study(), foreign)
    heads = [b.header for b in report.parse_markdown(text)]
    assert heads[:3] == ["Title", "Performance", "Long-context (64K Tokens)"]
    assert heads[3].startswith("Model precision") and heads[4].startswith("precision_cfg")
    assert "some prose\n" in text


def test_per_layer_config_sections_and_front_json(tmp_path):
    base = DEFAULT.replace(ff1_3="bfp4", li_ff1_3="lofi")
    layers = [base] * N_LAYERS
    layers[0] = DEFAULT
    mc = ModelConfig(tuple(layers))
    rec = synthetic_record(base, 0)
    rec.config, rec.decoder_json, rec.top1 = str(mc), mc.to_decoder_json(), 99.0  # on every front
    study = build_study(extra_records=[rec])
    a = pareto.analyze(study)
    text = report.update_report(None, report.build_sections(a))
    assert report.find_section(text, str(mc)) is not None
    files = report.write_report(a, tmp_path / "PERF.md")
    n = a.points[-1].number
    data = json.loads((tmp_path / "lt-pareto" / "front" / f"{n}.json").read_text())
    assert ModelConfig.from_decoder_json(data, N_LAYERS) == mc
    opt = (tmp_path / "lt-pareto" / "front" / "optimizations.txt").read_text()
    assert f"per-layer: use {n}.json" in opt
    assert files.csv.exists()


def test_csv_and_front_export(tmp_path):
    study = build_study()
    a = pareto.analyze(study)
    files = report.write_report(a, tmp_path / "reports" / "PERF.md")
    df = pd.read_csv(files.csv)
    assert len(df) == 12
    for col in ("config", "top1", "top1_lo", "top1_hi", "top5_lo", "speed:N150", "ttft:N300", "front",
                "front:N300", "within_noise:N150", "within_noise", "kld"):
        assert col in df.columns
    assert sorted(df.loc[df["front"], "trial"]) == pareto.optuna_front_numbers(study)
    fdir = tmp_path / "reports" / "lt-pareto" / "front"
    lines = [ln for ln in (fdir / "optimizations.txt").read_text().splitlines() if not ln.startswith("#")]
    assert [int(ln.split("\t")[0]) for ln in lines] == a.front_numbers()
    for ln in lines:
        n, _, opt = ln.split("\t")
        cfg = Config.parse(opt)
        assert str(cfg) == opt == a.point(int(n)).config
        dj = json.loads((fdir / f"{n}.json").read_text())
        assert ModelConfig.from_decoder_json(dj, N_LAYERS) == ModelConfig.uniform(cfg, N_LAYERS)


def test_cli_report(tmp_path, capsys):
    log = tmp_path / "lt.log"
    build_study(storage=journal_storage(log))
    out = tmp_path / "reports" / "PERF.md"
    assert cli.main(["report", str(log), "-o", str(out)]) == 2  # a missing folder is a typo: never created
    assert "no directory" in capsys.readouterr().err and not out.parent.exists()
    out.parent.mkdir()
    assert cli.main(["report", str(log), "-o", str(out)]) == 0
    text = out.read_text()
    assert [b.header for b in report.sections(text)][1:] == seed_config_headers()
    assert (tmp_path / "reports" / "lt-pareto" / "points.csv").exists()
    assert "hypervolume" in capsys.readouterr().out
    # --configs front writes only front configs
    out2 = tmp_path / "front.md"
    assert cli.main(["report", str(log), "-o", str(out2), "--configs", "front"]) == 0
    n_cfg = sum(1 for b in report.sections(out2.read_text()) if b.header.startswith("precision_cfg"))
    assert n_cfg == len(pareto.analyze(pareto.open_study(log)).front_numbers())


# --- the regression check ----------------------------------------------------------------------------
@dataclass
class FakeResult:
    top1: float
    top5: float


class FakeEvaluator:
    """Stands in for engine.accuracy.evaluator.Evaluator: measures what the table says, minus `drop`."""

    calls: list = []

    def __init__(self, model, prefill, decode, measured):
        self.model, self.prefill, self.decode, self.measured = model, prefill, decode, measured
        FakeEvaluator.calls.append((model, prefill, decode))

    def evaluate(self, cfg):
        return FakeResult(*self.measured(self.model, str(cfg)))


def _factory(measured):
    return lambda model, prefill, decode: FakeEvaluator(model, prefill, decode, measured)


def test_check_passes_and_fails_by_the_half_point_rule():
    text = build_report(build_study())
    study_vals = {p.config: (p.record.top1, p.record.top5) for p in pareto.analyze(build_study()).points}
    perf = str(performance("smollm2-135m"))
    # measured = the table's whole percent - 0.4: passes; one config measured 1 point low: fails
    bad = seed_config_headers()[4]

    def measured(model, cfg):
        t1, t5 = study_vals[cfg]
        t1, t5 = round(t1) - 0.4, round(t5) - 0.4
        return (t1 - 0.7, t5) if cfg == bad else (t1, t5)

    FakeEvaluator.calls = []
    lines = []
    verdicts = report.check_report(text, evaluator_factory=_factory(measured), emit=lines.append)
    assert len(verdicts) == 2 * 13 and len(lines) == 26
    failed = [v for v in verdicts if not v.ok]
    assert [v.section for v in failed] == [bad, bad] and {v.device for v in failed} == {"N300", "N150"}
    assert sum(ln.startswith("FAIL") for ln in lines) == 2 and sum(ln.startswith("PASS") for ln in lines) == 24
    assert [v.ok for v in verdicts if v.section == "Performance"] == [True, True]
    assert perf in study_vals
    # one evaluator per (model, prefill, decode), settings from the notes line
    assert FakeEvaluator.calls == [("smollm2-135m", 512, 511)]


def test_check_skips_dp_rows_other_models_and_non_config_sections():
    text = SEED  # Llama rows only; long-context and batch-32 sections have no config
    seen = []

    def measured(model, cfg):
        seen.append((model, cfg))
        return (100.0, 100.0)

    verdicts = report.check_report(text, model="Llama3.2-1B", evaluator_factory=_factory(measured), emit=lambda s: None)
    assert {v.model for v in verdicts} == {"Llama3.2-1B"}
    assert len(verdicts) == 6 + 12  # Performance + Accuracy (N150, N300, T3K; DP rows skipped) + 12 config rows
    assert all(v.ok for v in verdicts)
    dp = "## Performance\n\n| Model | Device | Top-1 (%) | Top-5 (%) |\n|---|---|---|---|\n| Llama3.2-1B (DP=4) | N300 | 90 | 98 |\n"
    assert report.check_report(dp, evaluator_factory=_factory(measured), emit=lambda s: None) == []


def test_check_reports_models_it_cannot_run():
    def factory(model, prefill, decode):
        raise FileNotFoundError("weights not installed")

    lines = []
    verdicts = report.check_report(SEED, model="llama3.2-1b", evaluator_factory=factory, emit=lines.append)
    assert verdicts and all(v.ok is None for v in verdicts) and all(ln.startswith("SKIP") for ln in lines)


def test_check_reads_prefill_and_decode_from_the_notes_line():
    study = build_study(configs=lt_pareto_configs()[:1])
    study.set_user_attr("spec", {"eval": {"prefill": 64, "decode": 63}})
    text = build_report(study)
    FakeEvaluator.calls = []
    report.check_report(text, evaluator_factory=_factory(lambda m, c: (100.0, 100.0)), emit=lambda s: None)
    assert FakeEvaluator.calls == [("smollm2-135m", 64, 63)]


CHECK_REPORT = DATA / "check-report.md"


@pytest.mark.skipif(not CHECK_REPORT.exists(), reason="tests/data/check-report.md not committed")
def test_sweep_check_on_the_committed_report(capsys):
    """The real check: tiny-llama through engine.accuracy.evaluator on a small committed report with one
    passing and one failing section."""
    pytest.importorskip("engine.accuracy.evaluator")
    rc = cli.main(["check", str(CHECK_REPORT), "--model", "tiny-llama"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert rc == 1
    passing = [ln for ln in lines if ln.startswith("PASS")]
    failing = [ln for ln in lines if ln.startswith("FAIL")]
    assert len(passing) == 2 and len(failing) == 1, out
    assert "ff1_3: bfp4" in failing[0]  # the section whose table claims more than the engine measures
    assert "2 passed, 1 failed" in out


def test_sweep_check_exit_status_with_a_fake_engine(tmp_path, monkeypatch, capsys):
    text = build_report(build_study(configs=lt_pareto_configs()[:2]))
    path = tmp_path / "PERF.md"
    path.write_text(text)
    monkeypatch.setattr(report_check, "default_evaluator", _factory(lambda m, c: (100.0, 100.0)))
    assert cli.main(["check", str(path)]) == 0
    monkeypatch.setattr(report_check, "default_evaluator", _factory(lambda m, c: (0.0, 0.0)))
    assert cli.main(["check", str(path)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli.main(["check", str(path), "--model", "no-such-model"]) == 2
