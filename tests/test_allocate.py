"""Per-layer allocation: probe spaces, the exact solver against brute force, damage additivity,
and `sweep sensitivity` / `sweep allocate` end to end on tiny-llama."""
from __future__ import annotations

import csv
import json
import random

import pytest
from scipy.stats import spearmanr
from worker_hooks import HOOK

from engine.vocab.config import DEFAULT, ConfigError, ModelConfig
from sweep import allocate as alloc
from sweep.cli import main
from sweep.probes import Probe, ProbeSpace, family
from sweep.space import parse_spec, sensitivity_study, spec_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

FAMS = {"ff1_3": ("bfp4", "bfp8", "bf16"), "kv_cache": ("bfp4", "bfp8", "bf16"), "wo": ("bfp4", "bfp8", "bf16")}


def _space(n_layers: int = 2, fams=FAMS) -> ProbeSpace:
    return ProbeSpace(n_layers, ModelConfig.uniform(DEFAULT, n_layers), fams)


# --- probes ------------------------------------------------------------------------------------
def test_probe_space_holds_the_base_and_every_single_change():
    sp = _space()
    assert sp.size == 1 + 2 * 3 * 2  # base + layers x families x other choices
    labels = [p.label for p in sp.probes]
    assert labels[0] == "base" and "L1.kv_cache=bf16" in labels and "L0.ff1_3=bfp8" not in labels  # bfp8 is the base's
    for p in sp.probes[1:]:
        mc = sp.probe_config(p)
        differ = [i for i in range(2) if mc.layers[i] != DEFAULT]
        assert differ == [p.layer]
        assert Probe.parse(p.label) == p
        assert sp.params_of(mc) == {"probe": p.label}
    c = sp.probe_config(Probe(0, "ff1_3", "bfp4")).layers[0]
    assert (c.ff1_3.value, c.li_ff1_3.value) == ("bfp4", "lofi")  # natural fidelity follows the format


def test_a_weight_family_keeps_the_base_fidelity_for_its_own_format():
    base = DEFAULT.replace(li_ff1_3="hifi2fp16")
    assert family("ff1_3").changes("bfp8", base) == {}
    assert family("ff1_3").changes("bf16", base) == {"ff1_3": "bf16", "li_ff1_3": "hifi4"}


def test_families_must_not_share_keys():
    with pytest.raises(ConfigError, match="both set li_ff1_3"):
        _space(fams={"ff1_3": ("bfp4", "bfp8"), "li_ff1_3": ("lofi", "hifi4")})


def test_sensitivity_section_round_trips_through_the_stored_spec():
    doc = {"study": {"model": "tiny-llama", "name": "t", "storage": "journal:/tmp/never-written.log"},
           "space": {"configs": ["defaults"]},
           "sensitivity": {"prefill": 16, "decode": 15, "families": ["ff1_3", "sdpa_prefill"],
                           "choices": {"sdpa_prefill": ["lofi", "hifi4"]}}}
    spec = parse_spec(doc, n_layers=2)
    ss = sensitivity_study(spec)
    assert ss.name == "t.sensitivity" and ss.eval["prefill"] == 16 and ss.space.size == 1 + 2 * (2 + 1)
    again = spec_from_dict(ss.to_dict())
    assert [p.label for p in again.space.probes] == [p.label for p in ss.space.probes]
    assert spec_from_dict(spec.to_dict()).sensitivity == spec.sensitivity
    bad = dict(doc, sensitivity={"families": ["ff1_3", "bogus"]})
    with pytest.raises(ConfigError, match="unknown family 'bogus'"):
        parse_spec(bad, n_layers=2)


# --- the solver ------------------------------------------------------------------------------
def _problem(device: str = "N300", seed: int = 0) -> alloc.Problem:
    """tiny-llama's real per-option costs, random damages (seeded): a priced knapsack to check."""
    sp = _space()
    rng = random.Random(seed)
    damage = {(p.layer, p.family, p.choice): rng.uniform(-0.002, 0.05) for p in sp.probes[1:]}
    return alloc.build_problem("tiny-llama", device, sp, damage, {"batch": 1, "prefill": 128, "decode": 200})


@pytest.mark.parametrize("device", ["N150", "N300"])
def test_solver_equals_brute_force_over_every_choice(device):
    pb = _problem(device)
    assert len(pb.groups) == 6 and all(len(g) == 3 for g in pb.groups)  # 3^6 = 729 configs enumerated
    slow = 1e6 / pb.step_us
    fast = alloc.fastest_speed(pb)
    assert fast > slow
    weights = [pb.weights_gb + o.d_weights_gb for o in pb.options]
    budgets = [alloc.Budget(min_speed=slow + f * (fast - slow)) for f in (0.1, 0.5, 0.9, 1.0)]
    budgets += [alloc.Budget(max_weights_gb=min(weights) + f * (max(weights) - min(weights))) for f in (0.0, 0.5)]
    budgets += [alloc.Budget(min_speed=slow + 0.5 * (fast - slow), max_weights_gb=max(weights))]
    for b in budgets:
        got = alloc.allocate(pb, b)
        best = alloc.brute_force(pb, b)
        assert best is not None
        assert got.predicted_damage == pytest.approx(best[0], abs=1e-12), b
        assert not any(b.violation(got.speed, got.ttft_ms, got.weights_gb))


def test_an_impossible_budget_is_refused_with_the_reachable_speed():
    pb = _problem()
    with pytest.raises(alloc.Infeasible, match="fastest choices reach"):
        alloc.allocate(pb, alloc.Budget(min_speed=alloc.fastest_speed(pb) * 1.5))


def test_front_budgets_end_at_the_fastest_config():
    pb = _problem()
    bs = alloc.front_budgets(pb, 3)
    assert len(bs) == 3 and bs[-1].min_speed <= alloc.fastest_speed(pb)
    assert [b.min_speed for b in bs] == sorted(b.min_speed for b in bs)
    damages = [alloc.allocate(pb, b).predicted_damage for b in bs]
    assert damages == sorted(damages)  # a tighter budget never costs less damage


# --- additivity on a real (tiny) model ---------------------------------------------------------
def test_summed_single_layer_damage_ranks_mixed_configs(tiny_llama_dir, capsys):
    from engine.accuracy.evaluator import Evaluator

    ev = Evaluator("tiny-llama", prefill=32, decode=31)
    sp = _space(fams={"ff1_3": ("bfp4", "bfp8", "bf16"), "ff2": ("bfp4", "bfp8", "bf16"),
                      "kv_cache": ("bfp4", "bfp8", "bf16"), "wqkv": ("bfp4", "bfp8")})
    base = ev.evaluate(sp.base).kld
    damage = {(p.layer, p.family, p.choice): ev.evaluate(sp.probe_config(p)).kld - base for p in sp.probes[1:]}
    rng = random.Random(3)
    configs = []
    while len(configs) < 12:
        mc = sp.random_config(rng, p_change=0.4)
        if mc not in configs and mc != sp.base:
            configs.append(mc)
    predicted = [alloc.summed_damage(sp, mc, damage) for mc in configs]
    measured = [ev.evaluate(mc).kld - base for mc in configs]
    rho = spearmanr(predicted, measured).statistic
    with capsys.disabled():
        print(f"\n[additivity] tiny-llama, 12 random mixed configs: Spearman {rho:.3f}")
    assert rho > 0.7


# --- the command line --------------------------------------------------------------------------
STUDY = """
[study]
name = "tiny-alloc"
model = "tiny-llama"
devices = ["N150", "N300"]
storage = "journal:{dir}/tiny.log"
[eval]
prefill = 24
decode = 23
[space]
configs = ["defaults"]
[sensitivity]
prefill = 16
decode = 15
families = ["ff1_3", "kv_cache"]
"""

GRID = """
[study]
name = "tiny-grid"
model = "tiny-llama"
storage = "journal:{dir}/grid.log"
[space]
ff1_3 = ["bfp4", "bfp8", "bf16"]
kv_cache = ["bfp4", "bfp8"]
couple = {{ ff1_3 = "li_ff1_3" }}
"""


def test_sensitivity_then_allocate_end_to_end(tiny_llama_dir, tmp_path, capsys):
    study = tmp_path / "tiny.toml"
    study.write_text(STUDY.format(dir=tmp_path))
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(dir=tmp_path))
    out = tmp_path / "out"
    assert main(["allocate", str(study), "--device", "N300", "--front", "2", "--out", str(out)]) == 2
    assert "sweep sensitivity" in capsys.readouterr().err  # no profile yet: one line naming the fix
    assert main(["sensitivity", str(study), "--out", str(out), "--no-progress", "--fisher"]) == 0
    rows = list(csv.DictReader((out / "profile.csv").open()))
    assert all(r["fisher"] for r in rows) and -1 <= json.loads((out / "profile.json").read_text())["fisher_spearman"] <= 1
    assert len(rows) == 1 + 2 * 2 * 2 and rows[0]["probe"] == "base"
    assert (out / "profile-heatmap.png").stat().st_size > 1000
    worst = max(rows[1:], key=lambda r: float(r["d_kld"]))
    assert worst["choice"] == "bfp4" and float(worst["d_kld_lo"]) > 0  # bfp4 hurts, beyond noise
    capsys.readouterr()
    assert main(["allocate", str(study), "--device", "N300", "--front", "2", "--uniform", str(grid),
                 "--uniform-candidates", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "allocations.csv").open()))
    assert len(rows) == 2 and all(r["device"] == "N300" for r in rows)
    for r in rows:
        dj = json.loads((out / r["config_file"]).read_text())
        mc = ModelConfig.from_decoder_json(dj, 2)
        assert dj == mc.to_decoder_json()
        assert float(r["predicted_speed"]) >= float(r["min_speed"])
        assert r["measured_kld"] and r["measured_top1"] and r["measured_kld_short"] and r["trial"]
        assert r["uniform_config"] and float(r["uniform_speed"]) >= float(r["predicted_speed"]) - 1e-6
        assert r["kld_verdict"] in ("allocated better", "uniform better", "not distinguishable at 95%")
    # the allocations are trials of the study, marked as allocated
    from sweep.pareto import open_study
    from sweep.records import TrialRecord

    st = open_study(str(study))
    marked = [t for t in st.get_trials() if TrialRecord.from_user_attrs(t.user_attrs).allocation] if st else []
    assert len(marked) == 2
    # again with the same budgets: rows are replaced, not appended twice; the first-order damage works too
    assert main(["allocate", str(study), "--device", "N300", "--front", "2", "--no-eval", "--out", str(out)]) == 0
    assert len(list(csv.DictReader((out / "allocations.csv").open()))) == 2
    assert main(["allocate", str(study), "--device", "N150", "--max-weights-gb", "1", "--damage", "fisher", "--no-eval",
                 "--out", str(out)]) == 0
    assert len(list(csv.DictReader((out / "allocations.csv").open()))) == 3


def test_allocate_refuses_bad_budgets(tiny_llama_dir, tmp_path, capsys):
    study = tmp_path / "tiny.toml"
    study.write_text(STUDY.format(dir=tmp_path))
    for argv, needle in ((["--device", "T3K", "--front", "2"], "pick one of those"),
                         (["--device", "N150"], "give a budget"),
                         (["--device", "N150", "--front", "2", "--min-speed", "10"], "do not combine"),
                         (["--device", "N150", "--min-speed", "-3"], "positive number"),
                         (["--device", "N150", "--front", "0"], "K >= 1"),
                         (["--device", "N150", "--front", "2", "--uniform", str(study), "--uniform-candidates", "0"],
                          "--uniform-candidates must be >= 1"),
                         (["--device", "N150", "--front", "2", "--uniform", str(tmp_path / "none.toml")], "not found")):
        assert main(["allocate", str(study), *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    nosens = tmp_path / "plain.toml"
    nosens.write_text(STUDY.format(dir=tmp_path).split("[sensitivity]")[0])
    assert main(["sensitivity", str(nosens)]) == 2
    assert "no [sensitivity] section" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sensitivity_with_failed_probes_exits_1_and_retries(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """A profile with failed probes is not written: exit 1 naming --retry-failed, which then finishes it."""
    study = tmp_path / "tiny.toml"
    study.write_text(STUDY.format(dir=tmp_path))
    out = tmp_path / "out"
    monkeypatch.setenv("SWEEP_WORKER_HOOK", HOOK)  # tests/worker_hooks.py
    monkeypatch.setenv("SWEEP_TEST_FAIL", "kv_cache: bfp4")  # the workers' test hook: these probes raise
    assert main(["sensitivity", str(study), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "trial(s) failed" in err and f"sweep sensitivity {study} --retry-failed" in err
    assert not (out / "profile.csv").exists()
    monkeypatch.delenv("SWEEP_TEST_FAIL")
    assert main(["sensitivity", str(study), "--out", str(out), "--no-progress", "--retry-failed"]) == 0
    assert len(list(csv.DictReader((out / "profile.csv").open()))) == 1 + 2 * 2 * 2
