"""`sweep perf`: the analytic performance model (Wormhole N150/N300/T3K/TG, Blackhole P100/P150).

    sweep perf --model Llama3.1-8B --device N300 --config performance [--batch 1 --prefill 128
               --decode 200 --dp 1] [--json]
    sweep perf calibrate reference/PERF-seed.md [more.md ...] [--out FILE] [--dry-run] [--no-cv]
    sweep perf table [--markdown] [--seed FILE]
    sweep perf devices

A prediction prints speed and TTFT with their 90% prediction intervals, every op and every
collective of the step. `calibrate` fits the global parameters on the N150/N300/T3K rows of
seed-format markdown tables, prints the leave-one-device-out and leave-one-model-out errors and
writes engine/data/perf_params.json (TG rows are validation data: ignored, never fitted).
`table` prints every published model x device row with the prediction, its interval and the
error, plus pure predictions for the 70B-class models on T3K/TG and data-parallel rows.
`devices` lists the systems of the device table (engine/data/devices.json).
"""
from __future__ import annotations

import json
import sys

from sweep.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("perf", help="predict decode speed (t/s/u) and TTFT (ms) on Wormhole systems",
                       description=__doc__, formatter_class=_raw())
    p.add_argument("--model", help="seed model name (Llama3.1-8B), registry name (smollm2-135m) or HF directory")
    p.add_argument("--device", default="N150", help="a system of engine/data/devices.json (N150, N300, T3K, TG, P150, ...; "
                   "default N150)")
    p.add_argument("--config", default="performance", help="performance, accuracy, a config string or a path to a tt-metal decoder JSON file")
    p.add_argument("--batch", type=int, default=1, help="users per data-parallel replica (default 1)")
    p.add_argument("--prefill", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--decode", type=int, default=200, help="generated tokens (default 200)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (default 1)")
    p.add_argument("--params", help="perf parameter file (default: engine/data/perf_params.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_predict)
    ps = p.add_subparsers(dest="perf_command", metavar="{calibrate,table,devices}")

    c = ps.add_parser("calibrate", help="fit the global parameters on N150/N300/T3K rows of markdown tables")
    c.add_argument("tables", nargs="+", help="seed-format markdown files (e.g. reference/PERF-seed.md)")
    c.add_argument("--out", help="parameter file to write (default: engine/data/perf_params.json)")
    c.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    c.add_argument("--fit-pareto-ttft", action="store_true",
                   help="also fit TTFT of config-string sections (the lt pareto harness; off by default)")
    c.add_argument("--loss", choices=("soft_l1", "linear"), default="soft_l1",
                   help="soft_l1: robust least squares (default); linear: plain least squares")
    c.add_argument("--no-cv", action="store_true",
                   help="skip the leave-one-device-out / leave-one-model-out refits (no prediction intervals)")
    c.add_argument("--json", action="store_true", help="print the fit report as JSON")
    c.set_defaults(func=run_calibrate)

    t = ps.add_parser("table", help="every seed model x device row: predicted beside published, error in percent")
    t.add_argument("--markdown", action="store_true", help="markdown tables (default: aligned text)")
    t.add_argument("--seed", help="published tables to compare with (default: reference/PERF-seed.md)")
    t.add_argument("--params", help="perf parameter file (default: engine/data/perf_params.json)")
    t.add_argument("--no-extras", action="store_true", help="only the published rows")
    t.set_defaults(func=run_table)

    d = ps.add_parser("devices", help="the systems of the device table")
    d.set_defaults(func=run_devices)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _pi(iv, digits: int) -> str:
    return f" [{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]" if iv else ""


def run_predict(args) -> int:
    from engine.models.shapes import check_context, shape_for
    from engine.perf.model import predict

    if not args.model:
        raise ValueError("--model is required (or use `sweep perf calibrate` / `sweep perf table` / `sweep perf devices`)")
    check_context(shape_for(args.model), args.prefill, args.decode, "--prefill + --decode")
    res = predict(args.model, args.device, args.config, batch=args.batch, prefill=args.prefill,
                  decode=args.decode, dp=args.dp, params=args.params)
    if not res.fits:
        _does_not_fit(res, args)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    dp = f" DP={res.dp}" if res.dp > 1 else ""
    runs_as = f", runs as {res.system}" if res.system != res.device else ""
    print(f"{res.model} on {res.device}{dp} (TP={res.tp}, {res.layout}{runs_as}), batch {res.batch}, "
          f"prefill {res.prefill}{f' in {res.prefill_chunks} chunks' if res.prefill_chunks > 1 else ''}, "
          f"decode {res.decode}")
    level = f" ({100 * res.interval_level:.0f}% intervals)" if res.interval_level else ""
    print(f"  speed {res.speed_tsu:.1f}{_pi(res.speed_interval, 1)} t/s/u   TTFT {res.ttft_ms:.1f}{_pi(res.ttft_interval, 0)} ms"
          f"{level}   decode step {res.decode_step_ms:.2f} ms   throughput {res.throughput_tps:.0f} t/s")
    print(f"  weights {res.weights_gb_per_chip:.2f} GB/chip, KV cache {res.kv_cache_gb_per_chip:.2f} GB/chip"
          )
    for w in res.warnings:
        print(f"  WARNING: {w}")
    print(f"  {'op':30s} {'decode us':>10s} {'share':>6s} {'mem us':>9s} {'comp us':>9s} {'ovh us':>9s} "
          f"{'MB/step':>9s} {'prefill us':>11s} {'share':>6s}")
    for op, e in res.breakdown.items():
        print(f"  {op:30s} {e['decode_us']:10.1f} {100 * e['decode_share']:5.1f}% {e['decode_mem_us']:9.1f} "
              f"{e['decode_compute_us']:9.1f} {e['decode_overhead_us']:9.1f} {e['bytes'] / 1e6:9.2f} "
              f"{e['prefill_us']:11.1f} {100 * e['prefill_share']:5.1f}%")
    if res.collectives:
        print("  collectives per decoder layer (decode payload; us per issue):")
        for c in res.collectives:
            axis = "" if c["axis"] is None else f" axis {c['axis']}"
            print(f"    {c['name']:28s} {c['kind']:18s} {c['chips']} chips{axis} {c['topology']:4s} {c['links']} link(s) "
                  f"{c['decode_bytes'] / 1e3:8.1f} kB  decode {c['decode_us_each']:7.1f}  prefill {c['prefill_us_each']:8.1f}")
    return 0


def _does_not_fit(res, args) -> None:
    """A prediction for a model that does not fit in DRAM is no prediction: one line, exit 2."""
    from engine.perf.model import predict
    from engine.vocab.devices import device_for, device_names

    cap = device_for(res.device).chip.dram_gb
    bigger = [d for d in device_names() if d != res.device and predict(
        args.model, d, args.config, batch=args.batch, prefill=args.prefill, decode=args.decode, params=args.params).fits]
    fixes = [f"--device {' / '.join(bigger)}" if bigger else "a system with more chips"]
    if args.config.strip().lower() != "performance":
        fixes.append("bfp4 MLP weights (--config performance)")
    fixes.append("a smaller --batch / --prefill / --decode")
    raise UserError(f"{res.model} does not fit on {res.device}: {res.weights_gb_per_chip:.1f} GB weights + "
                    f"{res.kv_cache_gb_per_chip:.1f} GB KV cache per chip > {cap:g} GB; use "
                    f"{', '.join(fixes[:-1])} or {fixes[-1]}")


def run_calibrate(args) -> int:
    from engine.perf import calibrate as cal
    from engine.perf.model import PARAMS_FILE, load_params_file
    from sweep.commands.paths import check_output

    check_output(args.out, "--out")
    out = None if args.dry_run else (args.out or PARAMS_FILE)
    result = cal.calibrate(args.tables, out=out, fit_pareto_ttft=args.fit_pareto_ttft, loss=args.loss,
                           cross_validation=not args.no_cv)
    load_params_file.cache_clear()
    data = result["data"]
    meta = data["calibration"]
    if args.json:
        print(json.dumps({"params": data["params"], "calibration": meta, "intervals": data.get("intervals")}, indent=1))
        return 0
    if result["held_back"]:
        print(f"ignored {len(result['held_back'])} row(s) on {'/'.join(sorted({r.device for r in result['held_back']}))}: "
              "never fitted", file=sys.stderr)
    for n in meta["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"calibration rows: {meta['rows_used']} ({'/'.join(meta['devices'])}), speed figures {meta['speed_figures']}, "
          f"TTFT figures fitted {meta['ttft_figures']} of {meta['ttft_figures_read']}; "
          f"skipped empty rows {len(meta['skipped_empty'])}")
    print("fitted parameters:")
    for k, v in data["params"].items():
        tag = "" if k in data["fitted"] else "  (fixed)"
        print(f"  {k:18s} {v:12.5g}{tag}")
    m, w = meta["mape"], meta["worst"]
    print(f"MAPE speed {m['speed']:.2f}%   TTFT {m['ttft']:.2f}%   "
          f"(TTFT incl. lt-pareto rows {m['ttft_all_rows']:.2f}%)")
    for dev, dm in meta["mape_by_device"].items():
        print(f"  {dev:6s} speed {dm['speed']:6.2f}%   TTFT {dm['ttft']:6.2f}%")
    if w["speed"]:
        print(f"worst speed row: {w['speed']['row']}: published {w['speed']['published']:g}, "
              f"predicted {w['speed']['predicted']:.1f} ({w['speed']['err_pct']:+.1f}%)")
    if w["ttft"]:
        print(f"worst TTFT row:  {w['ttft']['row']}: published {w['ttft']['published']:g}, "
              f"predicted {w['ttft']['predicted']:.1f} ({w['ttft']['err_pct']:+.1f}%)")
    for key, title in (("lodo", "leave-one-device-out"), ("lomo", "leave-one-model-out")):
        if meta.get(key):
            print(f"{title} (refit without the group, predict it): speed / TTFT mean abs. error")
            for g, e in meta[key].items():
                f = lambda v: "   n/a" if v is None else f"{v:5.1f}%"
                print(f"  {g:26s} {f(e['speed_mape'])} / {f(e['ttft_mape'])}   ({e['n']} rows)")
    iv = data.get("intervals")
    if iv:
        print(f"{100 * iv['level']:.0f}% interval half-widths (log): " + "; ".join(
            f"{mt} in-sample {iv[mt]['in_sample']:.3f}, unseen model {iv[mt]['lomo']:.3f}, unseen device {iv[mt]['lodo']:.3f}"
            for mt in ("speed", "ttft")))
    print(f"wrote {out}" if out else "dry run: nothing written")
    return 0


def run_table(args) -> int:
    from engine.perf import calibrate as cal
    from engine.perf.model import calibration_note, load_params

    params = load_params(args.params) if args.params else None
    rows = cal.published_rows(args.seed)
    sections = cal.prediction_table(rows, params=params, extras=not args.no_extras)
    print(cal.format_prediction_table(sections, markdown=args.markdown, note=calibration_note(args.params)), end="")
    return 0


def run_devices(args) -> int:
    from engine.vocab.devices import DEVICES

    print(f"{'system':8s} {'chips':>5s} {'mesh':6s} {'topology':9s} {'links':6s} {'chip':15s} {'status':12s} notes")
    for d in DEVICES.values():
        status = "calibrated" if d.calibrated else ("never fitted" if d.arch == "wormhole" else "UNCALIBRATED")
        print(f"{d.name:8s} {d.chips:5d} {d.mesh[0]}x{d.mesh[1]:<4d} {d.topology:9s} {d.ccl_links[0]}/{d.ccl_links[1]:<4d} "
              f"{d.chip.name:15s} {status:12s} {d.notes}")
    return 0
