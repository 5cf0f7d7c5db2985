"""`sweep perf`: the analytic Wormhole performance model.

    sweep perf --model Llama3.1-8B --device N300 --config performance [--batch 1 --prefill 128
               --decode 200 --dp 1] [--json]
    sweep perf calibrate reference/PERF-seed.md [more.md ...] [--out FILE] [--dry-run]
    sweep perf table [--markdown] [--seed FILE]

`calibrate` fits the global parameters on the N150/N300 rows of seed-format markdown tables and
writes engine/data/perf_params.json (T3K/TG rows are validation data: ignored, never fitted).
`table` prints every published model x device row with the prediction beside it, plus pure
predictions for the 70B-class models on T3K/TG and data-parallel rows.
"""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("perf", help="predict decode speed (t/s/u) and TTFT (ms) on Wormhole systems",
                       description=__doc__, formatter_class=_raw())
    p.add_argument("--model", help="seed model name (Llama3.1-8B), registry name (smollm2-135m) or HF directory")
    p.add_argument("--device", default="N150", help="N150, N300, T3K or TG (default N150)")
    p.add_argument("--config", default="performance", help="performance, accuracy or a config string")
    p.add_argument("--batch", type=int, default=1, help="users per data-parallel replica (default 1)")
    p.add_argument("--prefill", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--decode", type=int, default=200, help="generated tokens (default 200)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (default 1)")
    p.add_argument("--params", help="perf parameter file (default: engine/data/perf_params.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_predict)
    ps = p.add_subparsers(dest="perf_command", metavar="{calibrate,table}")

    c = ps.add_parser("calibrate", help="fit the global parameters on N150/N300 rows of markdown tables")
    c.add_argument("tables", nargs="+", help="seed-format markdown files (e.g. reference/PERF-seed.md)")
    c.add_argument("--out", help="parameter file to write (default: engine/data/perf_params.json)")
    c.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    c.add_argument("--fit-pareto-ttft", action="store_true",
                   help="also fit TTFT of config-string sections (the lt pareto harness; off by default)")
    c.add_argument("--loss", choices=("soft_l1", "linear"), default="soft_l1",
                   help="soft_l1: robust least squares (default); linear: plain least squares")
    c.add_argument("--json", action="store_true", help="print the fit report as JSON")
    c.set_defaults(func=run_calibrate)

    t = ps.add_parser("table", help="every seed model x device row: predicted beside published, error in percent")
    t.add_argument("--markdown", action="store_true", help="markdown tables (default: aligned text)")
    t.add_argument("--seed", help="published tables to compare with (default: reference/PERF-seed.md)")
    t.add_argument("--params", help="perf parameter file (default: engine/data/perf_params.json)")
    t.add_argument("--no-extras", action="store_true", help="only the published rows")
    t.set_defaults(func=run_table)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def run_predict(args) -> int:
    from engine.perf import predict
    from engine.shapes import check_context, shape_for

    if not args.model:
        raise ValueError("--model is required (or use `sweep perf calibrate` / `sweep perf table`)")
    check_context(shape_for(args.model), args.prefill, args.decode, "--prefill + --decode")
    res = predict(args.model, args.device, args.config, batch=args.batch, prefill=args.prefill,
                  decode=args.decode, dp=args.dp, params=args.params)
    if not res.fits:
        _does_not_fit(res, args)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    dp = f" DP={res.dp}" if res.dp > 1 else ""
    print(f"{res.model} on {res.device}{dp} (TP={res.tp}, {res.layout}), batch {res.batch}, "
          f"prefill {res.prefill}, decode {res.decode}")
    print(f"  speed {res.speed_tsu:.1f} t/s/u   TTFT {res.ttft_ms:.1f} ms   decode step {res.decode_step_ms:.2f} ms   "
          f"throughput {res.throughput_tps:.0f} t/s")
    print(f"  weights {res.weights_gb_per_chip:.2f} GB/chip, KV cache {res.kv_cache_gb_per_chip:.2f} GB/chip"
          )
    print(f"  {'op':18s} {'decode us':>10s} {'share':>6s} {'mem us':>9s} {'comp us':>9s} {'ovh us':>9s} "
          f"{'MB/step':>9s} {'prefill us':>11s} {'share':>6s}")
    for op, e in res.breakdown.items():
        print(f"  {op:18s} {e['decode_us']:10.1f} {100 * e['decode_share']:5.1f}% {e['decode_mem_us']:9.1f} "
              f"{e['decode_compute_us']:9.1f} {e['decode_overhead_us']:9.1f} {e['bytes'] / 1e6:9.2f} "
              f"{e['prefill_us']:11.1f} {100 * e['prefill_share']:5.1f}%")
    return 0


def _does_not_fit(res, args) -> None:
    """A prediction for a model that does not fit in DRAM is no prediction: one line, exit 2."""
    from engine.devices import device_for, system_names
    from engine.perf import predict
    from sweep.cli import UserError

    cap = device_for(res.device).chip.dram_gb
    bigger = [d for d in system_names() if d != res.device and predict(
        args.model, d, args.config, batch=args.batch, prefill=args.prefill, decode=args.decode, params=args.params).fits]
    fixes = [f"--device {' / '.join(bigger)}" if bigger else "a system with more chips"]
    if args.config.strip().lower() != "performance":
        fixes.append("bfp4 MLP weights (--config performance)")
    fixes.append("a smaller --batch / --prefill / --decode")
    raise UserError(f"{res.model} does not fit on {res.device}: {res.weights_gb_per_chip:.1f} GB weights + "
                    f"{res.kv_cache_gb_per_chip:.1f} GB KV cache per chip > {cap:g} GB; use "
                    f"{', '.join(fixes[:-1])} or {fixes[-1]}")


def run_calibrate(args) -> int:
    from engine import calibrate as cal
    from engine.perf import PARAMS_FILE, _load_params_file

    out = None if args.dry_run else (args.out or PARAMS_FILE)
    result = cal.calibrate(args.tables, out=out, fit_pareto_ttft=args.fit_pareto_ttft, loss=args.loss)
    _load_params_file.cache_clear()
    data = result["data"]
    meta = data["calibration"]
    if args.json:
        print(json.dumps({"params": data["params"], "calibration": meta}, indent=1))
        return 0
    if result["held_back"]:
        print(f"ignored {len(result['held_back'])} T3K/TG row(s): held back to validate the model, never fitted",
              file=sys.stderr)
    for n in meta["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"calibration rows: {meta['rows_used']} (N150/N300), speed figures {meta['speed_figures']}, "
          f"TTFT figures fitted {meta['ttft_figures']} of {meta['ttft_figures_read']}; "
          f"skipped empty rows {len(meta['skipped_empty'])}")
    print("fitted parameters:")
    for k, v in data["params"].items():
        tag = "" if k in data["fitted"] else "  (fixed)"
        print(f"  {k:18s} {v:12.5g}{tag}")
    m, w = meta["mape"], meta["worst"]
    print(f"MAPE speed {m['speed']:.2f}%   TTFT {m['ttft']:.2f}%   "
          f"(TTFT incl. lt-pareto rows {m['ttft_all_rows']:.2f}%)")
    if w["speed"]:
        print(f"worst speed row: {w['speed']['row']}: published {w['speed']['published']:g}, "
              f"predicted {w['speed']['predicted']:.1f} ({w['speed']['err_pct']:+.1f}%)")
    if w["ttft"]:
        print(f"worst TTFT row:  {w['ttft']['row']}: published {w['ttft']['published']:g}, "
              f"predicted {w['ttft']['predicted']:.1f} ({w['ttft']['err_pct']:+.1f}%)")
    print(f"wrote {out}" if out else "dry run: nothing written")
    return 0


def run_table(args) -> int:
    from engine import calibrate as cal
    from engine.perf import calibration_note, load_params

    params = load_params(args.params) if args.params else None
    rows = cal.published_rows(args.seed)
    sections = cal.prediction_table(rows, params=params, extras=not args.no_extras)
    print(cal.format_prediction_table(sections, markdown=args.markdown, note=calibration_note(args.params)), end="")
    return 0
