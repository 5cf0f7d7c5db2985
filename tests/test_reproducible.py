"""Committed results reproduce: the fp32 reference matches its committed fingerprint with the
pinned packages (and without accelerate), and README's results table, reports/PERF.md and
reports/lt-pareto/points.csv agree with each other and with what the engine measures now.

When one of these fails after a deliberate change (new engine numerics, a new pin), regenerate
reports/ with `sweep run studies/lt-pareto.toml --report reports/PERF.md --plots reports/plots`,
copy the figures into README's table and, for a new reference, tests/data/smollm2_reference.json.

What is exact and what is not (docs/NUMERICS.md, "Reproducibility across CPUs"): token ids, the
reference's top-5 ids, the engine's logits and so every Top-1 / Top-5 figure are the same bits on
every CPU and are compared exactly. ln(ref_ppl) and KLD are means of fp32 log-softmax values whose
normaliser (a sum over the vocabulary) is accumulated in the order of the CPU's vector kernels;
they are compared within `engine.accuracy.evaluator.cross_cpu_tolerance(vocab)`, the derived bound on what
two summation orders can make of them, and `test_cross_cpu_tolerance_*` exercises that rule by
perturbing the reference's summation at that scale.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = json.loads((ROOT / "tests" / "data" / "smollm2_reference.json").read_text())
POINTS = ROOT / "reports" / "lt-pareto" / "points.csv"
PERF_MD = ROOT / "reports" / "PERF.md"
README = ROOT / "README.md"
MODEL = "smollm2-135m"

# Run in a fresh interpreter: accelerate reported as not installed (transformers then never uses
# it), then the fingerprint of the SmolLM2 reference and which of the optional packages got imported.
_FINGERPRINT_PROGRAM = r'''
import hashlib, json, math, sys

class HideAccelerate:
    """Delegates to the real finders but reports `accelerate` as not installed."""
    def __init__(self, finders):
        self.finders = finders
    def find_spec(self, name, path=None, target=None):
        if name == "accelerate" or name.startswith("accelerate."):
            return None
        for f in self.finders:
            spec = f.find_spec(name, path, target) if hasattr(f, "find_spec") else None
            if spec is not None:
                return spec
        return None
    def find_distributions(self, *args, **kwargs):
        for f in self.finders:
            if hasattr(f, "find_distributions"):
                yield from f.find_distributions(*args, **kwargs)

sys.meta_path[:] = [HideAccelerate(list(sys.meta_path))]
import numpy as np
from engine.accuracy import evaluator as accuracy
from engine.models import loaders

prefill, decode, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ref = accuracy.compute_reference(loaders.load("smollm2-135m", cache=cache), prefill, decode)
tiny = accuracy.Evaluator("tiny-llama", prefill=8, decode=8, cache_dir=cache).evaluate("defaults")  # HF-directory path
print(json.dumps({
    "ref_ppl": math.exp(-float(np.mean(ref.target_logp[ref.scored].astype(np.float64)))),
    "tokens_sha256": hashlib.sha256(np.ascontiguousarray(ref.tokens, dtype="<i4").tobytes()).hexdigest(),
    "top5_sha256": hashlib.sha256(np.ascontiguousarray(ref.top5, dtype="<i4").tobytes()).hexdigest(),
    "tiny_top1": tiny.top1,
    "imported": sorted({m.split(".")[0] for m in sys.modules} & {"accelerate", "tokenizers"}),
}))
'''

PINNED = ("transformers", "tokenizers", "gguf", "numpy", "safetensors")


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        name, sep, version = d.partition("==")
        if sep:
            out[name.strip()] = version.strip()
    return out


def test_reference_packages_are_pinned_to_the_fingerprints_versions():
    pins = _pins()
    assert {p: pins.get(p) for p in PINNED} == {p: FINGERPRINT["versions"][p] for p in PINNED}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if d.startswith("accelerate")], "accelerate is not needed (see the test below)"
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert [d for d in test_extra if d.startswith("accelerate")], (
        "the test extra needs accelerate: transformers loads a GGUF only with it (tests/test_loaders.py)")


def test_installed_versions_match_the_pins():
    installed = {p: metadata.version(p) for p in PINNED}
    assert installed == {p: _pins()[p] for p in PINNED}, "reinstall: pip install -e . (the reference depends on these)"


@pytest.mark.slow
def test_fp32_reference_matches_committed_fingerprint(smollm2_gguf, ttsweep_cache):
    """The reference, recomputed without accelerate, is bit-for-bit the committed one (token ids,
    top-5 ids) with the same perplexity; transformers needed tokenizers for the GGUF tokenizer."""
    out = subprocess.run([sys.executable, "-c", _FINGERPRINT_PROGRAM, str(FINGERPRINT["prefill"]),
                          str(FINGERPRINT["decode"]), str(ttsweep_cache)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["imported"] == ["tokenizers"], got["imported"]  # accelerate unused, tokenizers used
    assert math.isfinite(got["tiny_top1"])
    assert got["tokens_sha256"] == FINGERPRINT["tokens_sha256"], "the tokenizer or the bundled text changed"
    assert got["top5_sha256"] == FINGERPRINT["top5_sha256"], "the fp32 reference's top-5 ids changed"
    # summation-order dependent: 36.98857 on AVX-512 kernels, 36.98826 (committed) on AVX2 ones
    _same_across_cpus(got["ref_ppl"], FINGERPRINT["ref_ppl"], "reference perplexity", log=True)


def _tolerance() -> float:
    from engine.accuracy.evaluator import cross_cpu_tolerance
    from engine.models.loaders import model_spec

    return cross_cpu_tolerance(model_spec(MODEL).vocab)


def _same_across_cpus(got: float, committed: float, what: str, log: bool = False) -> None:
    """A summation-order dependent figure (ln ppl when `log`, else a KLD in nats) within the
    cross-CPU tolerance of the committed one."""
    tol = _tolerance()
    diff = math.log(got) - math.log(committed) if log else got - committed
    assert abs(diff) <= tol, (f"{what}: {got!r} here, {committed!r} committed: {'ln ' if log else ''}difference "
                              f"{diff:.3g} exceeds the cross-CPU tolerance {tol:.3g}: more than summation order moved")


# --- the cross-CPU rule, exercised -----------------------------------------------------------------
def _lane_logsumexp(z: torch.Tensor, lanes: int, bits: int = 24) -> torch.Tensor:
    """log(sum exp(z)) per row with the sum of exp(z - max) (each term correctly rounded to fp32)
    accumulated as a vector kernel of `lanes` lanes does it: every lane adds its terms one after
    another, rounding each partial sum to `bits` significant bits (24: fp32), then the lanes add
    pairwise. Returned in float64."""
    z = z.double()
    m = z.max(dim=-1, keepdim=True).values
    terms = (z - m).exp().float().double()
    pad = (-terms.shape[-1]) % lanes
    terms = torch.nn.functional.pad(terms, (0, pad)).reshape(terms.shape[0], -1, lanes)

    def rnd(x):
        if bits == 24:
            return x.float().double()
        mant, exp = torch.frexp(x)
        return torch.ldexp(torch.round(mant * 2.0 ** bits) / 2.0 ** bits, exp)

    acc = torch.zeros(terms.shape[0], lanes, dtype=torch.float64)
    for j in range(terms.shape[1]):
        acc = rnd(acc + terms[:, j])
    while acc.shape[-1] > 1:
        acc = rnd(acc[:, 0::2] + acc[:, 1::2])
    return m[:, 0] + acc[:, 0].log()


@pytest.mark.slow
def test_cross_cpu_tolerance_accepts_other_summation_orders_and_rejects_coarser_rounding(smollm2_evaluator):
    """The rule behind `_same_across_cpus`, on the SmolLM2 reference: recompute ln(ref_ppl) and a KLD
    with the log-softmax normaliser summed as kernels of 8, 16 and 64 fp32 lanes (and by this
    machine's own torch fp32 kernel): each stays within half the tolerance of the exact (float64)
    figure, so any two within the tolerance. The same 8-lane sum rounded at 2^10 times the fp32
    scale (14-bit significands) lands well outside: the tolerance is not vacuous."""
    from engine.accuracy.evaluator import vocab_sum_error

    ref = smollm2_evaluator.reference
    tol = _tolerance()
    z = torch.from_numpy(ref.logp).double()  # log-probs are logits (up to a per-row constant)
    targets = torch.from_numpy(ref.tokens[ref.prefill + 1:ref.prefill + ref.decode + 1].astype("int64"))
    z_t = z.gather(1, targets[:, None])[:, 0]
    trial = z.to(torch.bfloat16).double()  # a "trial": the reference's logits rounded to bf16
    p = torch.softmax(z, -1)
    kl_rest = (p * (torch.log_softmax(z, -1) - trial)).sum(-1)  # KL(p || q) = kl_rest + lse(trial)

    def figures(lse):
        return (lse(z) - z_t).mean().item(), (kl_rest + lse(trial)).mean().item()

    exact_ln_ppl, exact_kld = figures(lambda x: torch.logsumexp(x, -1))
    assert exact_kld > 1e-5  # the bf16 trial is a trial with a visible KLD
    orders = {f"{n} lanes": figures(lambda x, n=n: _lane_logsumexp(x, n)) for n in (8, 16, 64)}
    orders["torch fp32"] = figures(lambda x: torch.logsumexp(x.float(), -1).double())
    for name, (ln_ppl, kld) in orders.items():
        assert abs(ln_ppl - exact_ln_ppl) <= tol / 2, (name, ln_ppl - exact_ln_ppl, tol)
        assert abs(kld - exact_kld) <= tol / 2, (name, kld - exact_kld, tol)
    assert orders["8 lanes"] != orders["16 lanes"]  # the orders differ: the perturbation is real
    moved = max(abs(a[0] - exact_ln_ppl) for a in orders.values())
    assert moved > 1e-7 and moved < vocab_sum_error(ref.logp.shape[1])  # fp32 rounding scale, inside its bound
    coarse = figures(lambda x: _lane_logsumexp(x, 8, bits=14))
    assert abs(coarse[0] - exact_ln_ppl) > 3 * tol and abs(coarse[1] - exact_kld) > 3 * tol
    # and the comparison itself: within passes, coarser fails
    _same_across_cpus(math.exp(orders["8 lanes"][0]), math.exp(orders["16 lanes"][0]), "8 vs 16 lanes", log=True)
    with pytest.raises(AssertionError, match="cross-CPU tolerance"):
        _same_across_cpus(math.exp(coarse[0]), math.exp(exact_ln_ppl), "coarse", log=True)


# --- committed reports agree with each other ------------------------------------------------------
def _points() -> pd.DataFrame:
    return pd.read_csv(POINTS)


def _close(cell: str, value: float, what: str, order_dependent: bool = False) -> None:
    """`cell` is `value` as printed: equal within half a unit of the cell's last digit (plus the
    cross-CPU tolerance for a summation-order dependent figure: points.csv may come from another CPU)."""
    cell = cell.strip()
    assert cell, f"{what}: empty cell (the CSV has {value:.6g})"
    decimals = len(cell.partition(".")[2])
    slack = _tolerance() if order_dependent else 0.0
    assert abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-9 + slack, f"{what}: table {cell}, points.csv {value:.6g}"


def _readme_rows() -> list[list[str]]:
    text = README.read_text()
    start = text.index("## Results on SmolLM2-135M")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[1:]
    assert header[1:] == ["Top-1 (%)", "Top-5 (%)", "KLD (nats)", "N150 t/s/u"], header
    return body


def test_points_csv_uses_the_fingerprinted_reference():
    df = _points()
    assert set(df["model"]) == {MODEL}
    for ppl in df["ref_ppl"]:  # `sweep run` on another CPU rewrites points.csv: the same reference within the tolerance
        _same_across_cpus(ppl, FINGERPRINT["ref_ppl"], "points.csv ref_ppl (else reports/ were made against "
                          "another fp32 reference: regenerate them)", log=True)


def test_readme_results_table_matches_points_csv():
    from engine.models.loaders import model_spec
    from engine.vocab.config import ModelConfig

    df = _points()
    by_config = {c: r for c, r in zip(df["config"], df.to_dict("records"))}
    n_layers = model_spec(MODEL).n_layers
    rows = _readme_rows()
    assert len(rows) >= 4
    for row in rows:
        m = re.search(r"`([^`]+)`", row[0])
        assert m, f"README row {row[0]!r}: put the config (preset or diff) in backticks"
        config = str(ModelConfig.parse(m.group(1), n_layers, MODEL))
        assert config in by_config, f"README row {row[0]!r}: no such config in {POINTS.name}"
        r = by_config[config]
        for cell, col in zip(row[1:], ("top1", "top5", "kld", "speed:N150")):
            _close(cell, r[col], f"README {m.group(1)!r} {col}", order_dependent=col == "kld")


def test_perf_md_matches_points_csv():
    from sweep.report import display_name, parse_markdown

    df = _points()
    by_trial = {int(r["trial"]): r for r in df.to_dict("records")}
    by_config = {r["config"]: r for r in df.to_dict("records")}
    name = display_name(MODEL)
    checked = 0
    for block in parse_markdown(PERF_MD.read_text()):
        table = block.table() if block.is_section else None
        if table is None:
            continue
        header = block.header
        m = re.search(r"Study [\w.-]+, trial (\d+)", block.notes().get(name, ""))
        if header.startswith("precision_cfg"):
            point = by_config.get(header)
            assert point is not None, f"PERF.md section {header[:60]}...: config not in {POINTS.name}"
        else:  # ## Performance / ## Accuracy: the notes line names the trial
            assert m, f"PERF.md section {header!r}: no 'Study ..., trial N' in its notes"
            point = by_trial[int(m.group(1))]
        for row in table.rows:
            if table.cell(row, "Model") != name:
                continue
            dev = table.cell(row, "Device")
            for col, key in (("Top-1 (%)", "top1"), ("Top-5 (%)", "top5"),
                             ("Speed (t/s/u)", f"speed:{dev}"), ("TTFT (ms)", f"ttft:{dev}")):
                _close(table.cell(row, col), point[key], f"PERF.md {header[:40]} {dev} {col}")
            checked += 1
    assert checked >= 13, f"only {checked} PERF.md rows of {name} found"  # 13 configs x the study's device(s)


def _as_on_another_cpu(df: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """`df` with every summation-order dependent figure moved by `fraction` of its cross-CPU bound,
    alternately up and down (what another CPU's vector kernels make of it when `fraction` < 1)."""
    from sweep.report import ORDER_DEPENDENT

    tol, out = _tolerance(), df.copy()
    for col, (scale, bound) in ORDER_DEPENDENT.items():
        step = [fraction * bound * tol * (1 if i % 2 else -1) for i in range(len(out))]
        out[col] = [v * math.exp(d) if scale == "log" else v + d for v, d in zip(out[col], step)]
    return out


def test_points_csv_rewritten_on_another_cpu_is_the_same_bytes(tmp_path):
    """`sweep run` / `sweep report` on a CPU whose kernels sum in another order (every KLD, ppl,
    ref_ppl, rms_dp within the cross-CPU tolerance of the committed ones) leaves the committed
    points.csv byte for byte as it is: a fresh clone's main job does not dirty the tree."""
    from sweep.report import ORDER_DEPENDENT, write_csv

    committed = pd.read_csv(POINTS)
    assert set(ORDER_DEPENDENT) <= set(committed.columns)
    out = tmp_path / "points.csv"
    out.write_bytes(POINTS.read_bytes())

    class Rerun:  # the analysis of the same trials made on the other CPU
        def frame(self):
            return _as_on_another_cpu(committed, 0.9)

    write_csv(Rerun(), out)
    assert out.read_bytes() == POINTS.read_bytes()


def test_points_csv_takes_a_figure_that_moved_beyond_the_tolerance(tmp_path):
    """A figure outside the cross-CPU tolerance (an engine, model or text change), or any change of an
    exact column, is written anew; only figures within the tolerance keep the file's digits."""
    from sweep.report import ORDER_DEPENDENT, write_csv

    committed = pd.read_csv(POINTS)
    new = _as_on_another_cpu(committed, 0.9)
    moved = _as_on_another_cpu(committed, 1.5)
    for col in ORDER_DEPENDENT:
        new.loc[1, col] = moved.loc[1, col]
    new.loc[2, "top1"] = committed.loc[2, "top1"] + 1e-9  # exact columns: any change is written
    out = tmp_path / "points.csv"
    out.write_bytes(POINTS.read_bytes())

    class Rerun:
        def frame(self):
            return new

    write_csv(Rerun(), out)
    got = pd.read_csv(out)
    for col in ORDER_DEPENDENT:
        assert got.loc[1, col] == moved.loc[1, col] != committed.loc[1, col], col
        assert (got.drop(index=1)[col] == committed.drop(index=1)[col]).all(), col
    assert got.loc[2, "top1"] == new.loc[2, "top1"] != committed.loc[2, "top1"]
    write_csv(Rerun(), tmp_path / "fresh.csv")  # no file yet: every figure as computed
    assert pd.read_csv(tmp_path / "fresh.csv")["kld"].tolist() == new["kld"].tolist()


@pytest.mark.slow
def test_committed_defaults_row_is_what_the_engine_measures(smollm2_evaluator):
    """Re-evaluate one committed row (the defaults: the README's first line) with today's engine."""
    df = _points()
    r = df[df["config"] == str(smollm2_evaluator.model_config("defaults"))].iloc[0]
    res = smollm2_evaluator.evaluate("defaults")
    assert res.tokens == r["tokens"]
    assert res.top1 == pytest.approx(r["top1"], abs=1e-9), "Top-1 moved: regenerate reports/ and README"
    assert res.top5 == pytest.approx(r["top5"], abs=1e-9), "Top-5 moved: regenerate reports/ and README"
    _same_across_cpus(res.kld, r["kld"], "defaults KLD (if the engine changed: regenerate reports/ and README)")


# --- reports/allocate: the committed allocation results agree with the code --------------------
ALLOC = ROOT / "reports" / "allocate"
ALLOC_STUDY = ROOT / "studies" / "smollm2-allocate.toml"


def test_committed_profile_covers_the_study_probes():
    """profile.csv lists exactly the probes the study's [sensitivity] section defines, in order."""
    from sweep.space import load_spec, sensitivity_study

    sspec = sensitivity_study(load_spec(ALLOC_STUDY))
    prof = pd.read_csv(ALLOC / "profile.csv")
    assert list(prof["probe"]) == [p.label for p in sspec.space.probes]
    assert (prof["d_kld_lo"] <= prof["d_kld"] + 1e-12).all() and (prof["d_kld"] <= prof["d_kld_hi"] + 1e-12).all()
    info = json.loads((ALLOC / "profile.json").read_text())
    assert info["probes"] == len(prof) - 1 and info["prefill"] == sspec.eval["prefill"]


def test_committed_allocations_match_the_performance_model_and_the_profile():
    """Each allocations.csv row: its decoder JSON is a SmolLM2 config within the budget, its predicted
    speed is what engine.perf.model predicts now, its predicted damage is the profile's sum over its changes."""
    from engine.perf import model as perf
    from engine.vocab.config import ModelConfig
    from sweep.space import load_spec

    spec = load_spec(ALLOC_STUDY)
    prof = pd.read_csv(ALLOC / "profile.csv")
    dmg = {r.probe: r.damage for r in prof.itertuples()}
    rows = pd.read_csv(ALLOC / "allocations.csv").to_dict("records")
    assert rows
    for r in rows:
        mc = ModelConfig.parse(str(ALLOC / r["config_file"]), spec.n_layers, spec.model)
        p = perf.predict(spec.model, r["device"], mc, **spec.perf)
        assert p.speed_tsu == pytest.approx(r["predicted_speed"], abs=1e-3)
        assert p.speed_tsu >= r["min_speed"]
        changes = str(r["changes"]).split() if isinstance(r["changes"], str) else []
        assert sum(dmg[c] for c in changes) == pytest.approx(r["predicted_damage"], abs=2e-6)
        assert math.isfinite(r["measured_kld"]) and math.isfinite(r["measured_top1"])


def test_allocation_readme_figures_come_from_the_committed_csvs():
    """reports/allocate/README.md quotes the additivity Spearman computed from additivity.csv."""
    from scipy.stats import spearmanr

    add = pd.read_csv(ALLOC / "additivity.csv")
    rho = spearmanr(add["predicted_kld"], add["measured_kld"]).statistic
    text = (ALLOC / "README.md").read_text()
    assert f"Spearman {rho:.3f}" in text
    for r in pd.read_csv(ALLOC / "allocations.csv").itertuples():
        assert f"{r.measured_kld:.4f}" in text
