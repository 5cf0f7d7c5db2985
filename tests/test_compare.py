"""Multi-window evaluation, per-token records in studies, `sweep compare`, `sweep eval --json`'s
KLD statistics, the paired "within noise" rule and `[eval] windows` / `--windows` plumbing.

tiny-llama with a short evaluation (prefill 16, decode 15) everywhere but the slow SmolLM2 test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.accuracy import evaluator as accuracy
from engine.accuracy.evaluator import Evaluator
from engine.accuracy.stats import A_BETTER, SAME
from engine.accuracy.token_record import TokenRecord
from sweep.cli import main
from sweep.records import TrialRecord, accuracy_attrs, token_record_of

P, D = 16, 15
LOW = "precision_cfg = {ff1_3: bfp4, ff2: bfp4}, fidelity_cfg = {li_ff1_3: lofi, li_ff2: lofi}"
KLD_KEYS = {"kld_mean", "kld_se", "kld_p50", "kld_p90", "kld_p99", "kld_p999", "kld_max", "rms_dp", "same_top_p"}


@pytest.fixture(scope="module")
def tiny3(ttsweep_cache):
    return Evaluator("tiny-llama", prefill=P, decode=D, windows=3)


# --- windows -------------------------------------------------------------------------------------
def test_windows_are_disjoint_consecutive_and_window_0_is_the_single_window_method(tiny3, ttsweep_cache):
    length = accuracy.reference_length(P, D)
    stream = accuracy.text_tokens(tiny3.loaded.tokenizer, 3 * length)
    for w, ref in enumerate(tiny3.references):
        assert ref.window == w and ref.tokens.tolist() == stream[w * length:(w + 1) * length]
        assert ref.path.name.endswith(".safetensors") and (w == 0) == ("-W" not in ref.path.name)
    assert len({r.path for r in tiny3.references}) == 3
    single = Evaluator("tiny-llama", prefill=P, decode=D)
    assert single.reference.path == tiny3.reference.path  # window 0 is the single-window cache file
    r1, r3 = single.evaluate("performance"), tiny3.evaluate("performance")
    assert r3.windows == 3 and r3.tokens == 3 * D and len(r3.record) == 3 * D and r3.record.windows == 3
    assert r3.record.window(0).equals(r1.record)  # window 0 = tt-metal's single-window figures
    assert r3.top1_windows[0] == pytest.approx(r1.top1)
    assert r3.top1 == pytest.approx(np.mean(r3.top1_windows))
    assert r3.top1_ci[1] - r3.top1_ci[0] < r1.top1_ci[1] - r1.top1_ci[0]  # more tokens, narrower interval
    assert r3.stats["kld_mean"] == pytest.approx(r3.kld) and r3.stats["same_top_p"] == pytest.approx(r3.top1)


def test_bos_starts_every_window(ttsweep_cache):
    class Tok:  # a tokenizer that adds a BOS (id 1) like Llama's
        bos_token_id = 1

        def encode(self, text, add_special_tokens=True):
            return [1] + [2 + (ord(c) % 50) for c in text]

    w0, w2 = accuracy.window_tokens(Tok(), 64, 0), accuracy.window_tokens(Tok(), 64, 2)
    stream = accuracy.text_tokens(Tok(), 3 * 64)
    assert w0 == stream[:64] and w0[0] == 1
    assert w2[0] == 1 and w2[1:] == stream[129:192]  # its first text token replaced, as llama-perplexity does
    with pytest.raises(ValueError, match="use fewer windows"):
        accuracy.window_tokens(Tok(), 10**6, 5)


def test_window_references_are_computed_once(tmp_path, monkeypatch):
    calls = []
    real = accuracy.compute_reference
    monkeypatch.setattr(accuracy, "compute_reference", lambda *a, **k: calls.append(a[3] if len(a) > 3 else k.get("window", 0)) or real(*a, **k))
    ev = Evaluator("tiny-llama", prefill=P, decode=D, windows=3, cache_dir=tmp_path)
    assert sorted(calls) == [0, 1, 2]
    ev.evaluate("defaults")
    ev.evaluate("performance")
    Evaluator("tiny-llama", prefill=P, decode=D, windows=2, cache_dir=tmp_path)  # a subset: all cached
    Evaluator("tiny-llama", prefill=P, decode=D, windows=3, cache_dir=tmp_path)
    assert sorted(calls) == [0, 1, 2]
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == 3
    with pytest.raises(ValueError, match="windows"):
        Evaluator("tiny-llama", prefill=P, decode=D, windows=0, cache_dir=tmp_path)


# --- sweep eval / sweep compare ------------------------------------------------------------------
def test_sweep_eval_json_prints_kld_statistics(capsys):
    assert main(["eval", "--model", "tiny-llama", "--config", LOW, "--prefill", str(P), "--decode", str(D),
                 "--windows", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert KLD_KEYS <= out.keys() and out["windows"] == 2 and out["tokens"] == 2 * D and len(out["top1_windows"]) == 2
    assert out["kld_p50"] <= out["kld_p90"] <= out["kld_p99"] <= out["kld_p999"] <= out["kld_max"]
    assert out["kld_mean"] == pytest.approx(out["kld"]) and out["same_top_p"] == pytest.approx(out["top1"])
    assert main(["eval", "--model", "tiny-llama", "--windows", "0"]) == 2
    assert "--windows must be >= 1" in capsys.readouterr().err


def test_sweep_compare_configs(capsys):
    args = ["compare", "--model", "tiny-llama", "--prefill", str(P), "--decode", str(D), "--windows", "2"]
    assert main(args + ["--config", "defaults", "--config", "defaults", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["p_value"] == 1.0 and same["discordant"] == [0, 0] and same["verdict"] == SAME
    assert same["delta_top1"] == [0.0, 0.0, 0.0] and same["delta_kld"] == [0.0, 0.0, 0.0] and same["tokens"] == 2 * D
    assert main(args + ["--config", "reference", "--config", LOW, "--device", "N150", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"p_value", "discordant", "delta_top1", "delta_kld", "verdict", "tokens"} <= out.keys()
    assert out["kld_verdict"] == A_BETTER and out["delta_kld"][2] < 0  # the fp32 reference has KLD ~0
    assert out["a"]["speed"] > 0 and out["b"]["speed"] > 0
    assert main(args + ["--config", "reference", "--config", LOW]) == 0
    text = capsys.readouterr().out
    assert "exact McNemar p =" in text and "verdict:" in text and "moving-block bootstrap" in text
    assert main(args + ["--config", "defaults"]) == 2
    assert "exactly two --config" in capsys.readouterr().err


def _tiny_study(tmp_path: Path, windows: int) -> Path:
    p = tmp_path / "cmp.toml"
    p.write_text(f"""
[study]
model = "tiny-llama"
devices = ["N150"]
objectives = ["top1", "speed:N150"]
storage = "journal:{tmp_path / 'cmp.log'}"
[eval]
prefill = {P}
decode = {D}
windows = {windows}
[space]
base = "defaults"
configs = ["reference", "{LOW}", "defaults"]
""")
    return p


def test_a_study_stores_records_and_sweep_compare_reads_them(tmp_path, capsys):
    from sweep.space import load_spec
    from sweep.study import load_study, run

    path = _tiny_study(tmp_path, windows=2)
    spec = load_spec(path)
    assert spec.eval == {"prefill": P, "decode": D, "windows": 2} and spec.to_dict()["eval"]["windows"] == 2
    run(spec, workers=1, progress=False)
    capsys.readouterr()
    trials = sorted(load_study(spec).get_trials(), key=lambda t: t.number)
    recs = [token_record_of(t.user_attrs) for t in trials]
    assert all(r is not None and len(r) == 2 * D and r.windows == 2 for r in recs)
    for t, r in zip(trials, recs):
        tr = TrialRecord.from_user_attrs(t.user_attrs)
        assert tr.windows == 2 and len(tr.top1_windows) == 2 and KLD_KEYS <= tr.kld_stats.keys()
        assert tr.tokens_record().equals(r) and 100 * r.top1.mean() == pytest.approx(tr.top1)
    assert main(["compare", str(path), "0", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["p_value"] == 1.0
    assert main(["compare", str(path), "0", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["a"]["trial"] == 0 and out["b"]["trial"] == 1 and out["tokens"] == 2 * D
    assert out["kld_verdict"] == A_BETTER
    assert main(["compare", str(path), "0", "9"]) == 2
    assert "no trial 9" in capsys.readouterr().err
    assert main(["compare", str(path), "0", "x"]) == 2
    # the journal file works as STUDY too
    assert main(["compare", str(tmp_path / "cmp.log"), "1", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["a"]["trial"] == 1


def test_reused_accuracy_carries_the_record():
    rec = TokenRecord(np.ones(4, bool), np.ones(4, bool), np.full(4, 0.1), np.full(4, 0.9), np.zeros(4), eval_key="k")
    attrs = {"top1": 100.0, "top5": 100.0, "top1_ci": [90.0, 100.0], "top5_ci": [90.0, 100.0], "kld": 0.1, "ppl": 2.0,
             "ref_ppl": 2.0, "tokens": 4, "windows": 1, "top1_windows": [100.0], "kld_stats": {"kld_mean": 0.1},
             "token_record": rec.to_base64(), "config": "x", "speed": {}}
    acc = accuracy_attrs(attrs)
    assert acc["token_record"] == attrs["token_record"] and acc["top1_ci"] == (90.0, 100.0)
    old = {k: v for k, v in attrs.items() if k not in ("windows", "top1_windows", "kld_stats", "token_record")}
    tr = TrialRecord(config="x", model="m", **accuracy_attrs(old))  # a trial from before records existed
    assert tr.windows == 1 and tr.token_record is None and tr.tokens_record() is None


# --- the within-noise rule -----------------------------------------------------------------------
def _point(number, top1_hits, speed):
    from sweep.pareto import Point

    n = len(top1_hits)
    rec = TokenRecord(top1_hits, np.ones(n, bool), np.full(n, 0.01), np.ones(n), np.zeros(n), eval_key="k")
    k = int(np.sum(top1_hits))
    from sweep.pareto import wilson_interval

    tr = TrialRecord(config=f"c{number}", model="m", top1=100 * k / n, top5=100.0, top1_ci=wilson_interval(k, n),
                     top5_ci=(99.0, 100.0), kld=0.01, ppl=1.0, ref_ppl=1.0, tokens=n, speed={"N150": speed},
                     token_record=rec.to_base64())
    return Point(number, tr)


def test_within_noise_uses_the_paired_test_with_holm():
    from sweep.pareto import NOISE_PAIRED, NOISE_WILSON, device_front

    n = 511
    base = np.ones(n, bool)
    base[:40] = False  # 92.2 %
    fast = base.copy()
    fast[40:50] = False  # front point at speed 100: loses 10 more tokens than `base`
    pts = [_point(0, base, 90.0), _point(1, fast, 100.0)]
    close = base.copy()
    close[0] = True
    close[60:63] = False  # 2 tokens worse than point 0 net: not significantly
    pts.append(_point(2, close, 90.0))
    far = fast.copy()
    far[100:115] = False  # 15 tokens worse than point 1 on the same positions, speed 95
    pts.append(_point(3, far, 95.0))
    df = device_front(pts, "N150")
    assert df.front == [1, 0] and df.noise_rule == NOISE_PAIRED
    assert df.within_noise == [2]
    # unpaired, the Wilson intervals of all four overlap: every off-front point was "within noise"
    for p in pts:
        p.record.token_record = None
        del p._tokens
    old = device_front(pts, "N150")
    assert old.noise_rule == NOISE_WILSON and old.within_noise == [2, 3]


def test_holm_needs_the_smallest_p_to_clear_alpha_over_k():
    from sweep.pareto import within_noise_paired

    n = 511
    pts_hits = []
    for k in range(3):  # three front points at one speed; each beats the weak point 8 to 1 on discordant tokens
        h = np.ones(n, bool)
        h[100 * k + 50] = False
        pts_hits.append(h)
    weak = np.ones(n, bool)
    weak[400:408] = False
    recs = [TokenRecord(h, h, np.zeros(n), np.ones(n), np.zeros(n)) for h in pts_hits + [weak]]
    speed = np.array([[1.0], [1.0], [1.0], [1.0]])
    front = np.array([True, True, True, False])
    # McNemar p of each front point vs the weak point: between 0.05/3 and 0.05 -> Holm keeps it in noise
    from engine.accuracy.stats import significantly_better

    ps = [significantly_better(r, recs[3]) for r in recs[:3]]
    assert all(0.05 / 3 < p < 0.05 for p in ps), ps
    assert within_noise_paired(recs, speed, ["maximize"], front).tolist() == [False, False, False, True]
    # without the correction it would have been called dominated: the correction matters
    assert min(ps) < 0.05


# --- study file and report plumbing --------------------------------------------------------------
def test_eval_windows_in_study_files(tmp_path):
    from sweep.space import StudyFileError, load_spec

    p = _tiny_study(tmp_path, windows=1)
    spec = load_spec(p)
    assert spec.eval["windows"] == 1 and "windows" not in spec.to_dict()["eval"]  # old studies still resume
    for bad in ("0", "1000", '"two"'):
        p.write_text(p.read_text().replace("windows = 1", f"windows = {bad}"))
        with pytest.raises(StudyFileError, match="eval.windows"):
            load_spec(p)
        p.write_text(p.read_text().replace(f"windows = {bad}", "windows = 1"))


def test_check_reads_windows_from_notes_and_takes_an_override():
    from sweep import report

    text = """## Performance

| Model | Device | Top-1 (%) | Top-5 (%) | Speed (t/s/u) | TTFT (ms) |
|---|---|---|---|---|---|
| tiny-llama | N150 | 50 | 60 | 1.0 | 1 |

Notes (tiny-llama): Accuracy: 16-token prefill + 15 teacher-forced decode steps in each of 4 windows vs fp32 reference.
"""
    seen = []

    class Fake:
        def __init__(self, *args):
            seen.append(args)

        def evaluate(self, cfg):
            return type("R", (), {"top1": 60.0, "top5": 70.0, "top1_windows": [55.0, 65.0, 60.0, 60.0]})()

    lines = []
    v = report.check_report(text, evaluator_factory=Fake, emit=lines.append)
    assert seen == [("tiny-llama", 16, 15, 4)] and v[0].ok and "4 windows" in lines[0]
    report.check_report(text, evaluator_factory=Fake, emit=lines.append, windows=1)
    assert seen[-1] == ("tiny-llama", 16, 15)  # one window: the plain (model, prefill, decode) factory call


@pytest.mark.slow
def test_smollm2_paired_test_separates_bfp4_mlp_from_defaults(smollm2_evaluator):
    from test_accuracy import BFP4_LOFI_MLP, smol

    from engine.accuracy.stats import compare

    dflt, low = smol(smollm2_evaluator, "defaults"), smol(smollm2_evaluator, BFP4_LOFI_MLP)
    cmp = compare(dflt.record, low.record)
    assert cmp.tokens == 511 and cmp.kld_verdict == A_BETTER and cmp.delta_kld[2] < 0
    assert cmp.discordant[0] > cmp.discordant[1] and cmp.delta_top1[0] > 0
    assert math.isfinite(cmp.p_value) and 0 < cmp.p_value <= 1
    assert len(dflt.record.to_base64()) < 5000  # a few KB per trial
    same = compare(dflt.record, smol(smollm2_evaluator, "defaults").record)
    assert same.p_value == 1.0 and same.discordant == (0, 0)
