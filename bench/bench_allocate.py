"""Allocation benchmark and validation (issue 15), from a study whose sensitivity profile and
allocations exist (`sweep sensitivity`, `sweep allocate`):

1. additivity: N random mixed configs of the profile's choices (each (layer, family) changed with
   probability 0.3), queued in the sensitivity study (the profile's short window), measured;
   Spearman / Pearson of predicted (base + summed damage) against measured KLD;
2. cost: the profile's evaluation wall time and one allocation's solve time as ratios to one full
   trial of the study (its base trial, same machine), plus the profile in full-trial equivalents;
3. the first-order estimate's rank agreement (from `<out>/profile.json`, `sweep sensitivity --fisher`);
4. allocations (`<out>/allocations.csv`) against the best uniform config and, with `--nsga2
   STUDY`, against the least-KLD NSGA-II trial at least as fast (paired verdicts on the same tokens).

Writes `<out>/additivity.csv` and `<out>/README.md` (every figure of the allocation report).

    python bench/bench_allocate.py studies/smollm2-allocate.toml --random 20 --nsga2 studies/smollm2-allocate-nsga2.toml
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import pearsonr, spearmanr  # noqa: E402


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", default="studies/smollm2-allocate.toml")
    ap.add_argument("--random", type=int, default=20, help="random mixed configs for the additivity check")
    ap.add_argument("--quick", action="store_true", help="5 random configs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nsga2", help="an NSGA-II study file over the same choices (run with `sweep run` first, or here)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="reports/allocate")
    ap.add_argument("--cost-only", action="store_true",
                    help="only time the profile's cost and rewrite that line of <out>/README.md (no study needed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.random = min(args.random, 5)
    return args


def _additivity(args, sspec, sstudy, raw, base_kld: float, out: Path):
    """1. additivity: random mixed configs measured against the summed profile; (rows, Spearman, Pearson)."""
    from sweep import allocate as alloc
    from sweep.profile import trials_by_config
    from sweep.study import enqueue_config, load_study
    from sweep.study import run as run_study

    space = sspec.space
    rng = random.Random(args.seed)
    mixed = []
    while len(mixed) < args.random:
        mc = space.random_config(rng, 0.3)
        if mc != space.base and mc not in mixed:
            mixed.append(mc)
    for i, mc in enumerate(mixed):
        enqueue_config(sstudy, mc, {"additivity": i})
    run_study(sspec, workers=args.workers, progress=False)
    by_cfg = trials_by_config(load_study(sspec))

    add_rows = []
    for i, mc in enumerate(mixed):
        t = by_cfg[str(mc)]
        changed = sum(a != b for a, b in zip(mc.layers, space.base.layers))
        add_rows.append({"i": i, "layers_changed": changed, "predicted_kld": base_kld + alloc.summed_damage(space, mc, raw),
                         "measured_kld": float(t.user_attrs["kld"]), "measured_top1": float(t.user_attrs["top1"]),
                         "trial": t.number})
    pred = [r["predicted_kld"] for r in add_rows]
    meas = [r["measured_kld"] for r in add_rows]
    rho, r_lin = spearmanr(pred, meas).statistic, pearsonr(pred, meas).statistic
    with (out / "additivity.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(add_rows[0]))
        w.writeheader()
        w.writerows(add_rows)
    return add_rows, rho, r_lin


def _damage_rule(args, spec, sspec, sstudy, profile, base_kld: float, out: Path) -> list[dict]:
    """3b. the allocator's damage rule: the estimates against the upper ends of their intervals,
    each allocation measured on the profile's window (queued in the sensitivity study)."""
    from sweep import allocate as alloc
    from sweep.profile import damage_table, trials_by_config
    from sweep.study import enqueue_config, load_study
    from sweep.study import run as run_study

    space = sspec.space
    rule_rows = []
    budgets = [float(r["min_speed"]) for r in csv.DictReader((out / "allocations.csv").open()) if r["min_speed"]] \
        if (out / "allocations.csv").is_file() else []
    rule_cfgs = {}
    for col in ("d_kld", "damage"):
        pbc = alloc.build_problem(spec.model, spec.primary, space, damage_table(profile, col), spec.perf)
        for b in budgets:
            ac = alloc.allocate(pbc, alloc.Budget(min_speed=b))
            rule_cfgs[(col, b)] = ac
            enqueue_config(sstudy, ac.config, {"damage_rule": col})
    if rule_cfgs:
        run_study(sspec, workers=args.workers, progress=False)
        by_cfg = trials_by_config(load_study(sspec))
        for (col, b), ac in rule_cfgs.items():
            t = by_cfg[str(ac.config)]
            rule_rows.append({"rule": "estimate" if col == "d_kld" else "upper 95% end", "budget": b,
                              "changes": len(ac.changes), "predicted_kld": base_kld + ac.predicted_damage,
                              "measured_kld": float(t.user_attrs["kld"]), "measured_top1": float(t.user_attrs["top1"])})

    return rule_rows


def main(argv=None) -> int:
    args = _args(argv)
    if args.cost_only:
        return _cost_only(args)

    from sweep.profile import damage_table, measured
    from sweep.space import load_spec, sensitivity_study
    from sweep.study import load_study
    from sweep.study import run as run_study

    out = Path(args.out)
    spec = load_spec(args.study)
    sspec = sensitivity_study(spec)
    sstudy = load_study(sspec)
    profile = measured(sstudy, sspec.space)
    damage = damage_table(profile)  # what the allocator sums
    raw = damage_table(profile, "d_kld")  # the measured estimates: what additivity is about
    base_kld = float(profile["config_kld"].iloc[0])
    space = sspec.space

    add_rows, rho, r_lin = _additivity(args, sspec, sstudy, raw, base_kld, out)  # 1. additivity
    from sweep import allocate as alloc

    # 2. cost, as ratios to one full trial
    cost = profile_cost(spec, sspec, space, args.workers)
    one_trial = cost["one_trial_s"]
    t0 = time.perf_counter()
    pb = alloc.build_problem(spec.model, spec.primary, space, damage, spec.perf)
    a = alloc.allocate(pb, alloc.Budget(min_speed=float(allocs_speed(out) or alloc.fastest_speed(pb))))
    solve_s = time.perf_counter() - t0
    cost |= {"allocation_s": solve_s, "allocation_trials": solve_s / one_trial, "rounds": a.rounds}
    rule_rows = _damage_rule(args, spec, sspec, sstudy, profile, base_kld, out)

    info = json.loads((out / "profile.json").read_text()) if (out / "profile.json").is_file() else {}
    allocs = list(csv.DictReader((out / "allocations.csv").open())) if (out / "allocations.csv").is_file() else []

    # 4. NSGA-II at equal full evaluations
    nsga = []
    if args.nsga2:
        nspec = load_spec(args.nsga2)
        run_study(nspec, workers=args.workers, progress=False)
        nsga = _vs_nsga2(nspec, spec, allocs, out)
    _write_readme(out, spec, sspec, info, cost, rho, r_lin, add_rows, allocs, nsga, rule_rows)
    print(f"additivity: Spearman {rho:.3f}, Pearson {r_lin:.3f} over {len(add_rows)} random mixed configs")
    print(f"profile {cost['probes']} x {cost['one_probe_s']:.2f} s = {cost['profile_trials']:.1f} full trials; allocation "
          f"{cost['allocation_s']:.2f} s = {cost['allocation_trials']:.3f} trials")
    print(f"wrote {out / 'README.md'}, {out / 'additivity.csv'}")
    return 0


def allocs_speed(out: Path) -> float | None:
    """The middle budget of the committed allocations (the one timed), None when there are none."""
    if not (out / "allocations.csv").is_file():
        return None
    speeds = sorted(float(r["min_speed"]) for r in csv.DictReader((out / "allocations.csv").open()) if r["min_speed"])
    return speeds[len(speeds) // 2] if speeds else None


def _vs_nsga2(nspec, spec, allocs, out: Path) -> list[dict]:
    from optuna.trial import TrialState

    from engine.accuracy.stats import compare
    from sweep.profile import trials_by_config
    from sweep.records import token_record_of
    from sweep.study import load_study

    ts = load_study(nspec).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    full = trials_by_config(load_study(spec))
    rows = []
    for a in allocs:
        t = full.get(_config_of(a, spec, out))
        dev = a["device"]
        fast = [n for n in ts if n.user_attrs["speed"][dev] + 1e-9 >= float(a["predicted_speed"])]
        quick = max(ts, key=lambda n: n.user_attrs["speed"][dev])
        row = {"budget": a["config_file"], "nsga2_trials": len(ts), "nsga2_feasible": len(fast),
               "fastest": (quick.number, quick.user_attrs["speed"][dev], float(quick.user_attrs["kld"]),
                           float(quick.user_attrs["top1"])),
               "best": min((float(n.user_attrs["kld"]), n.user_attrs["speed"][dev], float(n.user_attrs["top1"]))
                           for n in ts)}
        if fast and t is not None:
            best = min(fast, key=lambda n: float(n.user_attrs["kld"]))
            c = compare(token_record_of(t.user_attrs), token_record_of(best.user_attrs))
            row |= {"nsga2_trial": best.number, "nsga2_kld": float(best.user_attrs["kld"]),
                    "nsga2_top1": float(best.user_attrs["top1"]), "nsga2_speed": best.user_attrs["speed"][dev],
                    "top1_verdict": c.verdict.replace("A better", "allocated better").replace("B better", "NSGA-II better"),
                    "kld_verdict": c.kld_verdict.replace("A better", "allocated better").replace("B better", "NSGA-II better"),
                    "p": c.p_value, "delta_kld": c.delta_kld}
        rows.append(row)
    return rows


def _config_of(row: dict, spec, out: Path) -> str:
    from engine.vocab.config import ModelConfig

    return str(ModelConfig.parse(str(out / row["config_file"]), spec.n_layers, spec.model))


def _timed(ev, config, repeat: int = 2) -> float:
    """Best of `repeat` warm runs (after one warm-up) of `config` on `ev`."""
    ev.evaluate(config)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        ev.evaluate(config)
        best = min(best, time.perf_counter() - t0)
    return best


def profile_cost(spec, sspec, space, workers: int) -> dict:
    """The profile's cost in full trials, all timed in this process: each worker runs the base once
    to keep every layer's input (the anchor), then a probe of layer L recomputes layers L.. and the
    head. One probe per layer is timed (a probe's cost depends on its layer, not its family);
    `probe_unanchored_s` is a probe run from scratch, as before anchors."""
    from collections import Counter

    from engine.accuracy.evaluator import Evaluator

    one_trial = _timed(Evaluator(spec.model, **spec.eval, device=spec.primary, **spec.numerics_kwargs()), space.base)
    ev = Evaluator(spec.model, prefill=sspec.eval["prefill"], decode=sspec.eval["decode"], device=spec.primary,
                   **spec.numerics_kwargs())
    unanchored = _timed(ev, space.base)
    t0 = time.perf_counter()
    ev.set_anchor(space.base)
    anchor_s = time.perf_counter() - t0
    at = Counter(p.layer for p in space.probes if p.layer is not None)
    total = workers * anchor_s + _timed(ev, space.base, 1)  # the anchors, and the base's own probe
    for layer in sorted(at):
        probe = next(p for p in space.probes if p.layer == layer)
        total += at[layer] * _timed(ev, space.probe_config(probe))
    n = space.size
    return {"one_trial_s": one_trial, "probes": n, "one_probe_s": total / n, "probe_unanchored_s": unanchored,
            "anchor_s": anchor_s, "workers": workers, "profile_s": total, "profile_trials": total / one_trial,
            "profile_trials_unanchored": n * unanchored / one_trial}


def _cost_only(args) -> int:
    import re

    from sweep.space import load_spec, sensitivity_study

    spec = load_spec(args.study)
    sspec = sensitivity_study(spec)
    cost = profile_cost(spec, sspec, sspec.space, args.workers)
    line = _cost_line(spec, cost)
    print(line)
    readme = Path(args.out) / "README.md"
    if readme.is_file():
        text = readme.read_text()
        readme.write_text(re.sub(r"^- Profile cost: .*$", lambda _m: line, text, count=1, flags=re.M))
        print(f"rewrote the profile-cost line of {readme}")
    return 0


def _cost_line(spec, cost) -> str:
    return (f"- Profile cost: {cost['probes']} probes x {cost['one_probe_s']:.2f} s on average (each probe recomputes "
            f"from its layer on, from the base's cached layer inputs; plus {cost['workers']} anchor run(s) of "
            f"{cost['anchor_s']:.2f} s) = {cost['profile_trials']:.1f} full trials, against "
            f"{cost['profile_trials_unanchored']:.1f} with every probe run from scratch ({cost['probe_unanchored_s']:.2f} s); "
            f"one full {spec.eval['prefill']}+{spec.eval['decode']} trial: {cost['one_trial_s']:.2f} s; all timed in one "
            "process, the ratio is what carries to another machine.")


def _write_readme(out, spec, sspec, info, cost, rho, r_lin, add_rows, allocs, nsga, rule_rows) -> None:
    from sweep.report import display_name

    L = [f"# Per-layer allocation: {display_name(spec.model)}", "",
         "Generated by `python bench/bench_allocate.py` from the study's profile and allocations "
         f"(`{spec.name}`); do not edit by hand.", "",
         "## Sensitivity profile", "",
         f"- Base `{info.get('base', 'defaults')}`, {info.get('probes', '?')} probes over {info.get('layers', '?')} layers "
         f"({', '.join(info.get('families', {}))}), each on a {sspec.eval['prefill']}+{sspec.eval['decode']}-token "
         "teacher-forced window: `profile.csv`, heatmap `profile-heatmap.png`.",
         _cost_line(spec, cost),
         f"- One allocation (pricing every option and solving, {cost['rounds']} solve(s)): {cost['allocation_s']:.2f} s = "
         f"{cost['allocation_trials']:.3f} full trials."]
    if "fisher_spearman" in info:
        L.append(f"- First-order (Fisher) estimate, one fp32 backward pass plus one layer per probe: Spearman "
                 f"{info['fisher_spearman']:.3f} with the measured delta-KLD over all probes (`sweep sensitivity --fisher`; "
                 "its cost as a same-run ratio to one trial: `python bench/bench_fisher.py`).")
    L += ["", "## Additivity", "",
          f"{len(add_rows)} random mixed configs (each layer's family changed with probability 0.3), measured on the "
          f"profile's window: Spearman {rho:.3f}, Pearson {r_lin:.3f} between predicted (base + summed single-change "
          "damage) and measured KLD (`additivity.csv`).", "",
          "## Allocations", "",
          "| budget | predicted t/s/u | changes | predicted KLD (short) | measured KLD (short) | KLD | Top-1 | "
          "best uniform (t/s/u, KLD, Top-1) | Top-1 verdict (p) | KLD verdict |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for a in allocs:
        uni = (f"{float(a['uniform_speed']):.1f}, {float(a['uniform_kld']):.4f}, {float(a['uniform_top1']):.1f}"
               if a.get("uniform_kld") else "")
        n = len(a["changes"].split()) if a.get("changes") else 0
        L.append(f"| {a['device']} >= {a['min_speed']} | {float(a['predicted_speed']):.1f} | {n} | "
                 f"{_f(a, 'predicted_kld_short')} | {_f(a, 'measured_kld_short')} | {_f(a, 'measured_kld')} | "
                 f"{_f(a, 'measured_top1', 1)} | {uni} | {a.get('top1_verdict', '')} ({_f(a, 'top1_p', 3)}) | "
                 f"{a.get('kld_verdict', '')} |")
    if rule_rows:
        L += ["", "## Damage rule", "",
              "The allocator prices each change at the upper end of its delta-KLD 95% interval (column `damage` "
              "of `sweep.profile`). The same budgets allocated on the estimates instead, each measured on the profile's window:",
              "", "| rule | budget t/s/u | changes | predicted KLD | measured KLD | Top-1 |", "|---|---|---|---|---|---|"]
        for r in rule_rows:
            L.append(f"| {r['rule']} | {r['budget']:g} | {r['changes']} | {r['predicted_kld']:.4f} | {r['measured_kld']:.4f} | "
                     f"{r['measured_top1']:.1f} |")
    if nsga:
        L += ["", "## Against NSGA-II", "",
              f"NSGA-II over the same per-layer choices, {nsga[0]['nsga2_trials']} full evaluations; for each budget its "
              "least-KLD trial at least as fast as the allocation:", "",
              "| budget | NSGA-II trials that fast | NSGA-II KLD / Top-1 | Top-1 verdict (p) | KLD verdict |", "|---|---|---|---|---|"]
        for r in nsga:
            if "nsga2_kld" in r:
                L.append(f"| {r['budget']} | {r['nsga2_feasible']} | {r['nsga2_kld']:.4f} / {r['nsga2_top1']:.1f} | "
                         f"{r['top1_verdict']} ({r['p']:.3g}) | {r['kld_verdict']} |")
            else:
                n, sp, kl, t1 = r["fastest"]
                L.append(f"| {r['budget']} | 0 | none as fast: its fastest, trial {n}, {sp:.1f} t/s/u, KLD {kl:.4f}, "
                         f"Top-1 {t1:.1f} | | |")
        kl, sp, t1 = nsga[0]["best"]
        L += ["", f"NSGA-II's least-KLD trial overall: KLD {kl:.4f}, Top-1 {t1:.1f}, {sp:.1f} t/s/u."]
    (out / "README.md").write_text("\n".join(L) + "\n")


def _f(row: dict, key: str, nd: int = 4) -> str:
    v = row.get(key)
    return f"{float(v):.{nd}f}" if v not in (None, "") else ""


if __name__ == "__main__":
    sys.exit(main())
