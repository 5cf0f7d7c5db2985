"""`sweep allocate STUDY --device D (--min-speed S | --max-ttft T | --max-weights-gb G | --front K)`:
per-layer configs that minimise the summed damage of the study's sensitivity profile under a budget
on device D (sweep.allocate: an exact 0-1 program, scipy.optimize.milp), each evaluated in full.

For every budget it writes `<out>/<device>-<budget>.json` (tt-metal decoder JSON: run it on
hardware with tt_transformers' `--decoder_config_file`, or here with `--config PATH`), queues the
config as a trial of the study (full window) and of its sensitivity study (the profile's short
window, where the predicted damage is comparable), runs them, and writes or replaces the budget's
row of `<out>/allocations.csv`: predicted speed / TTFT / damage against measured KLD and Top-1.
`--uniform GRID_STUDY` also queues the layer-type (uniform) configs of that study's space that
are at least as fast as the allocation (the `--uniform-candidates` with the least predicted
damage) and gives the paired verdict of the allocation against the best of them.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from sweep.commands.sensitivity import DEFAULT_OUT
from sweep.errors import UserError

CSV_COLUMNS = (
    "device", "min_speed", "max_ttft", "max_weights_gb", "config_file", "predicted_speed", "predicted_ttft",
    "predicted_weights_gb", "predicted_damage", "predicted_kld_short", "measured_kld_short", "measured_kld",
    "measured_top1", "trial", "changes", "uniform_config", "uniform_speed", "uniform_kld", "uniform_top1",
    "uniform_trial", "top1_verdict", "top1_p", "kld_verdict", "delta_kld", "solver", "rounds", "solve_s",
)


def register(sub) -> None:
    p = sub.add_parser("allocate", help="allocate formats and fidelities per decoder layer under a device budget",
                       description=__doc__)
    p.add_argument("study", help="study file with a [sensitivity] section whose profile is measured")
    p.add_argument("--device", required=True, help="device of the budget (one of the study's devices)")
    p.add_argument("--min-speed", type=float, nargs="+", metavar="TSU", help="decode speed budget(s), t/s/u")
    p.add_argument("--max-ttft", type=float, metavar="MS", help="TTFT limit, ms")
    p.add_argument("--max-weights-gb", type=float, metavar="GB", help="weights per chip limit (DRAM fit), GB")
    p.add_argument("--front", type=int, metavar="K", help="K speed budgets from the least-damage config's speed to the fastest")
    p.add_argument("--uniform", metavar="GRID_STUDY",
                   help="compare with the uniform (layer-type) configs of this study file's space, e.g. "
                        "studies/mlp-attention-grid.toml")
    p.add_argument("--uniform-candidates", type=int, default=3,
                   help="uniform configs evaluated per budget: the ones with the least predicted damage (default 3)")
    p.add_argument("--damage", choices=("measured", "fisher"), default="measured",
                   help="damage summed: the measured delta-KLD, or the first-order estimate (column fisher of "
                        "<out>/profile.csv, from `sweep sensitivity --fisher`)")
    p.add_argument("--no-eval", action="store_true", help="only solve and write the decoder JSON files")
    p.add_argument("-w", "--workers", type=int, default=1, help="worker processes for the evaluations (default 1)")
    p.add_argument("--storage", help="override the study file's storage URL")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep import allocate as alloc
    from sweep.commands.paths import check_output
    from sweep.profile import damage_table, measured, read_csv
    from sweep.space import load_spec, sensitivity_study
    from sweep.study import StudyNotFound, load_study

    spec = load_spec(args.study, storage=args.storage)
    sspec = sensitivity_study(spec)
    check_output(args.out, "--out", kind="dir", default=DEFAULT_OUT)
    device = next((d for d in spec.devices if d.lower() == args.device.lower()), None)
    if device is None:
        raise UserError(f"--device {args.device}: study {spec.name} evaluates {', '.join(spec.devices)}; "
                        "pick one of those (or add the device to [study] devices)")
    budgets = _budgets(args)
    grid = _grid(args, spec) if args.uniform else None
    out = Path(args.out)
    try:
        sstudy = load_study(sspec)
    except StudyNotFound:
        raise UserError(f"study {spec.name} has no sensitivity profile yet; run `sweep sensitivity {args.study}` first") from None
    profile = measured(sstudy, sspec.space)  # ProfileIncomplete: one line naming `sweep sensitivity`
    if args.damage == "fisher":
        fisher = read_csv(out / "profile.csv")
        if "fisher" not in fisher.columns:
            raise UserError(f"{out / 'profile.csv'} has no fisher column; run `sweep sensitivity {args.study} --fisher`")
        damage = damage_table(fisher, "fisher")
    else:
        damage = damage_table(profile)
    problem = alloc.build_problem(spec.model, device, sspec.space, damage, spec.perf)
    if args.front:
        budgets = alloc.front_budgets(problem, args.front)
    allocations, infeasible = [], []
    for b in budgets:
        try:
            allocations.append(alloc.allocate(problem, b))
        except alloc.Infeasible as exc:
            infeasible.append(str(exc))
    if not allocations:
        raise UserError(infeasible[0] if len(infeasible) == 1 else
                        f"no budget could be met on {device}; the fastest allocation reaches "
                        f"{alloc.fastest_speed(problem):.1f} t/s/u")
    for msg in infeasible:  # the other budgets go on
        print(f"sweep allocate: skipped: {msg}", file=sys.stderr)
    base_kld = float(profile["config_kld"].iloc[0])
    rows = []
    for a in allocations:
        path = out / f"{device}-{a.budget.label}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(a.config.to_decoder_json(), indent=1) + "\n")
        _print_allocation(a, device, path, problem)
        rows.append(_row(a, device, path, base_kld))
    if not args.no_eval:
        _evaluate(args, spec, sspec, problem, allocations, rows, damage, grid)
    _write_csv(out / "allocations.csv", rows)
    print(f"wrote {out / 'allocations.csv'} ({len(rows)} row{'s' if len(rows) != 1 else ''} added or replaced)")
    return 0


def _budgets(args):
    from sweep import allocate as alloc

    given = [x for x in (args.min_speed, args.max_ttft, args.max_weights_gb) if x is not None]
    if args.front is not None and given:
        raise UserError("--front K chooses its own speed budgets; do not combine it with --min-speed / --max-ttft / --max-weights-gb")
    if args.front is None and not given:
        raise UserError("give a budget: --min-speed S, --max-ttft MS, --max-weights-gb GB, or --front K")
    if args.front is not None:
        if args.front < 1:
            raise UserError(f"--front needs K >= 1 budgets, not {args.front}")
        return []
    speeds = args.min_speed or [None]
    try:
        return [alloc.Budget(s, args.max_ttft, args.max_weights_gb) for s in speeds]
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _print_allocation(a, device: str, path: Path, problem) -> None:
    base_speed = 1e6 / problem.step_us
    print(f"{device} {a.budget.label}: {len(a.changes)} change(s) to the base; predicted {a.speed:.1f} t/s/u "
          f"(base {base_speed:.1f}), TTFT {a.ttft_ms:.1f} ms, weights {a.weights_gb:.3f} GB/chip; summed damage "
          f"{a.predicted_damage:+.5f}; {a.solver}, {a.rounds} solve(s), {a.solve_s * 1e3:.0f} ms")
    print(f"  decoder JSON {path}  (tt_transformers: --decoder_config_file {path}; here: --config {path})")
    print(f"  config: {a.config}")


def _row(a, device: str, path: Path, base_kld: float) -> dict:
    return {"device": device, "min_speed": a.budget.min_speed or "", "max_ttft": a.budget.max_ttft or "",
            "max_weights_gb": a.budget.max_weights_gb or "", "config_file": path.name,
            "predicted_speed": round(a.speed, 4), "predicted_ttft": round(a.ttft_ms, 3),
            "predicted_weights_gb": round(a.weights_gb, 4), "predicted_damage": round(a.predicted_damage, 6),
            "predicted_kld_short": round(base_kld + a.predicted_damage, 6),
            "changes": " ".join(f"L{i}.{f}={c}" for i, f, c in a.changes), "solver": a.solver,
            "rounds": a.rounds, "solve_s": round(a.solve_s, 3)}


def _evaluate(args, spec, sspec, problem, allocations, rows, damage, grid) -> None:
    """Queue every allocation (full window in the study, short window in its sensitivity study)
    and the uniform configs it faces, run them, and fill the rows' measured columns."""
    from engine.accuracy.stats import compare
    from sweep.profile import trials_by_config
    from sweep.records import ALLOCATION, TrialRecord, token_record_of
    from sweep.study import enqueue_config, load_study
    from sweep.study import run as run_study

    study, sstudy = load_study(spec, create=True), load_study(sspec)
    uniforms = {}
    for a, row in zip(allocations, rows):
        info = {"device": row["device"], "budget": a.budget.label, "predicted_damage": row["predicted_damage"],
                "predicted_speed": row["predicted_speed"], "file": row["config_file"]}
        enqueue_config(study, a.config, {ALLOCATION: info})
        enqueue_config(sstudy, a.config, {ALLOCATION: info})
    if grid is not None:  # after every allocation: one equal to a uniform config is marked as allocated
        uniforms = _uniform_candidates(grid, args.uniform_candidates, spec, problem, allocations, damage)
        for label, configs in uniforms.items():
            for mc in configs:
                enqueue_config(study, mc, {"uniform_for": label})
    for s in (sspec, spec):
        run_study(s, workers=args.workers, progress=False)
    full, short = trials_by_config(load_study(spec)), trials_by_config(load_study(sspec))
    for a, row in zip(allocations, rows):
        t, ts = full.get(str(a.config)), short.get(str(a.config))
        if ts is not None:
            row["measured_kld_short"] = round(float(ts.user_attrs["kld"]), 6)
        if t is None:
            continue
        acc = TrialRecord.from_user_attrs(t.user_attrs).on(row["device"])  # the budget device's numerics
        row |= {"measured_kld": round(float(acc["kld"]), 6), "measured_top1": round(float(acc["top1"]), 2), "trial": t.number}
        cands = [full[str(mc)] for mc in uniforms.get(a.budget.label, []) if str(mc) in full]
        if not cands:
            continue
        best = min(cands, key=lambda u: float(u.user_attrs["kld"]))
        c = compare(token_record_of(t.user_attrs), token_record_of(best.user_attrs))
        row |= {"uniform_config": best.user_attrs["config"], "uniform_speed": round(best.user_attrs["speed"][row["device"]], 4),
                "uniform_kld": round(float(best.user_attrs["kld"]), 6), "uniform_top1": round(float(best.user_attrs["top1"]), 2),
                "uniform_trial": best.number, "top1_verdict": _verdict(c.verdict), "top1_p": round(c.p_value, 4),
                "kld_verdict": _verdict(c.kld_verdict), "delta_kld": f"{c.delta_kld[0]:+.5f} [{c.delta_kld[1]:+.5f}, {c.delta_kld[2]:+.5f}]"}


def _verdict(v: str) -> str:
    return v.replace("A better", "allocated better").replace("B better", "uniform better")


def _grid(args, spec):
    """The --uniform study file, checked before anything is written."""
    from sweep.space import load_spec

    if args.uniform_candidates < 1:
        raise UserError(f"--uniform-candidates must be >= 1, not {args.uniform_candidates}")
    grid = load_spec(args.uniform)
    if grid.model != spec.model:
        raise UserError(f"--uniform {args.uniform} studies {grid.model}, not {spec.model}; give a study of {spec.model}")
    return grid


def _uniform_candidates(grid, k: int, spec, problem, allocations, damage) -> dict[str, list]:
    """Per allocation (by budget label): the grid study's configs at least as fast on its device,
    least summed damage first (`k` of them). The grid is priced once."""
    from engine.perf import model as perf
    from sweep import allocate as alloc

    priced = []
    for _, mc in grid.space.grid():
        try:
            dmg = alloc.summed_damage(problem.space, mc, damage)
        except KeyError:
            continue  # a choice the profile did not measure
        priced.append((dmg, str(mc), perf.predict(spec.model, problem.device, mc, **spec.perf).speed_tsu, mc))
    priced.sort(key=lambda x: (x[0], x[1]))
    return {a.budget.label: [mc for _, _, speed, mc in priced if speed + 1e-9 >= a.speed][:k]
            for a in allocations}


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Add `rows` to the CSV, replacing rows of the same config file."""
    old = []
    if path.is_file():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    new = {r["config_file"] for r in rows}
    keep = [r for r in old if r.get("config_file") not in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in keep + rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
