"""`sweep compare`: is config A more accurate than config B, on the same tokens?

    sweep compare --model M --config A --config B [--device D] [--windows N] [--json]
    sweep compare STUDY 3 7 [--storage URL] [--study-name NAME] [--device D] [--json]

The first form evaluates both configs (N disjoint windows, default 1); the second reads the
per-token records of two trials of a study. Both print the exact McNemar test on the Top-1
discordant positions, moving-block paired-bootstrap 95% intervals of delta-Top-1 and delta-KLD
(A minus B; engine.accuracy.stats says how and why) and a verdict: A better / B better / not
distinguishable at 95% (on Top-1; the KLD verdict beside it). `--device D` adds each config's
predicted speed on D (and is passed to the engine where it emulates per device). `--json` prints one object with p_value, discordant ([A right B wrong,
B right A wrong]), delta_top1 and delta_kld ([estimate, lo, hi]), verdict, kld_verdict, tokens.
"""
from __future__ import annotations

import argparse
import json

from sweep.commands.evaluate import add_eval_args
from sweep.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("compare", help="paired test of two configs (or two trials of a study): McNemar + block bootstrap",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="*", metavar="STUDY A B",
                   help="a study (file, journal or URL) and two trial numbers; omit to evaluate --config A --config B")
    add_eval_args(p, "disjoint 1024-token windows scored per config (default 1: tt-metal's method)")
    p.add_argument("--config", action="append", default=[], help="config A, then config B (preset, config string or a path to a tt-metal decoder JSON file)")
    p.add_argument("--device", help="also show each config's predicted speed on this device (N150, N300, T3K, TG)")
    p.add_argument("--storage", help="with a study file: override its storage URL")
    p.add_argument("--study-name", help="which study, when the storage holds several")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.target:
        if len(args.target) != 3 or args.config:
            raise UserError("give either STUDY A B (two trial numbers) or --config A --config B, not both")
        side_a, side_b = _from_study(args)
    else:
        if len(args.config) != 2:
            raise UserError(f"give exactly two --config (A then B), got {len(args.config)}; or STUDY A B")
        side_a, side_b = _from_model(args)
    from engine.accuracy.stats import compare

    cmp = compare(side_a["record"], side_b["record"])
    out = cmp.to_dict() | {"a": _public(side_a), "b": _public(side_b)}
    if args.json:
        print(json.dumps(out))
        return 0
    _print(cmp, side_a, side_b)
    return 0


def _public(side: dict) -> dict:
    return {k: v for k, v in side.items() if k != "record"}


def _speed(model: str, device: str | None, config, perf: dict | None = None) -> float | None:
    if not device:
        return None
    from engine.perf import model as perf_model

    return float(perf_model.predict(model, device, config, **(perf or {})).speed_tsu)


def _from_model(args) -> tuple[dict, dict]:
    from sweep.commands.evaluate import evaluator_for

    if args.device:
        from engine.vocab.devices import normalise_device

        args.device = normalise_device(args.device)  # an unknown device fails here, before any evaluation
    ev = evaluator_for(args, args.config, device=args.device)
    sides = []
    for label, text in zip("AB", args.config):
        mc = ev.model_config(text)
        r = ev.evaluate(mc)
        sides.append({"label": label, "config": r.config, "model": r.model, "top1": r.top1, "kld": r.kld,
                      "top1_windows": r.top1_windows, "speed": _speed(args.model, args.device, mc),
                      "device": args.device, "record": r.record})
    return sides[0], sides[1]


def _from_study(args) -> tuple[dict, dict]:
    from sweep.pareto import open_study
    from sweep.records import token_record_of

    target, *numbers = args.target
    try:
        nums = [int(n) for n in numbers]
    except ValueError:
        raise UserError(f"trial numbers must be integers, got {' '.join(numbers)}") from None
    study = open_study(target, args.study_name, args.storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    devices = list(study.user_attrs.get("devices") or [])
    if args.device and args.device not in devices:
        raise UserError(f"study {study.study_name!r} predicts speed for {', '.join(devices) or 'no device'}, "
                        f"not {args.device!r}; pick one of those with --device")
    device = args.device or (devices or [None])[0]
    sides = []
    for label, n in zip("AB", nums):
        t = trials.get(n)
        if t is None:
            raise UserError(f"study {study.study_name!r} has no trial {n} (trials 0..{max(trials, default=-1)})")
        if t.state.name != "COMPLETE":
            raise UserError(f"trial {n} of study {study.study_name!r} is {t.state.name}, not COMPLETE")
        rec = token_record_of(t.user_attrs)
        if rec is None:
            raise UserError(f"trial {n} of study {study.study_name!r} has no per-token record (run before records "
                            "existed); compare its config with `sweep compare --model M --config A --config B`")
        a = t.user_attrs
        speed = (a.get("speed") or {}).get(device) if device else None
        sides.append({"label": label, "trial": n, "config": a.get("config", ""), "model": a.get("model", ""),
                      "top1": a.get("top1"), "kld": a.get("kld"), "top1_windows": a.get("top1_windows") or [],
                      "speed": speed, "device": device, "record": rec})
    return sides[0], sides[1]


def _print(cmp, a: dict, b: dict) -> None:
    from sweep.plots import short_config

    for s in (a, b):
        what = f"trial {s['trial']}: " if "trial" in s else ""
        speed = f"   {s['speed']:.1f} t/s/u on {s['device']} (predicted)" if s.get("speed") is not None else ""
        print(f"{s['label']}: {what}{short_config(s['config']) or 'defaults'}")
        print(f"   Top-1 {s['top1']:.2f}%   KLD {s['kld']:.5f}{speed}")
    n_ab, n_ba = cmp.discordant
    win = f"{cmp.windows} windows" if cmp.windows > 1 else "1 window"
    print(f"{cmp.tokens} scored positions ({win}); Top-1 discordant: A right B wrong {n_ab}, B right A wrong {n_ba}; "
          f"exact McNemar p = {cmp.p_value:.4g}")
    d1, dk = cmp.delta_top1, cmp.delta_kld
    print(f"delta Top-1 (A - B) {d1[0]:+.2f} points [{d1[1]:+.2f}, {d1[2]:+.2f}]   delta KLD (A - B) {dk[0]:+.5f} nats "
          f"[{dk[1]:+.5f}, {dk[2]:+.5f}]   (95%, moving-block bootstrap: blocks of {cmp.block}, {cmp.n_resamples} resamples)")
    print(f"verdict: {cmp.verdict} (Top-1, exact McNemar at 95%); KLD: {cmp.kld_verdict}")
