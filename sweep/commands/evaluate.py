"""`sweep eval --model NAME --config CONFIG [--device N150] [--prefill 512 --decode 511] [--windows N] [--json]`: one
accuracy trial (engine.accuracy.evaluator.Evaluator) of a preset, config string or tt-metal decoder JSON file
against the fp32 reference, with llama.cpp-style KLD statistics and, for N windows, each window's Top-1.

`--assume NAME=VALUE` runs it under a switch of the assumption band (engine.vocab.assumptions: rules no
document or silicon result settles); `--assumptions` runs the config under every alternative alone and all
together and prints how far Top-1 / Top-5 / KLD move (`--json`: an `assumptions` object)."""
from __future__ import annotations

import json

from sweep.errors import UserError


def add_eval_args(p, windows_help: str = "disjoint 1024-token windows scored (default 1: tt-metal's method)") -> None:
    """--model, --prefill, --decode, --windows, --lm-head and --cache-dir (shared with `sweep compare`)."""
    p.add_argument("--model", default="smollm2-135m",
                   help="registry name (smollm2-135m, tiny-llama, tiny-qwen2, tiny-phi3) or a path to an HF directory / .gguf")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens (default 512)")
    p.add_argument("--decode", type=int, default=511, help="teacher-forced decode steps scored (default 511)")
    p.add_argument("--windows", type=int, default=1, help=windows_help)
    p.add_argument("--lm-head", default=None, metavar="FORMAT,FIDELITY",
                   help="override the model-level LM head, e.g. bf16,hifi4 (default bfp8,hifi2fp16 as tt_transformers)")
    p.add_argument("--cache-dir", default=None, help="cache root (default $TTSWEEP_CACHE or ~/.cache/ttsweep)")
    p.add_argument("--torch-device", default=None, help="where the engine runs: cpu (default), cuda, cuda:N")
    p.add_argument("--tt-metal", default=None, metavar="PROFILE",
                   help="the tt-metal release whose numerics rules apply: seed (default; the committed reports) or "
                        "current (engine.vocab.profiles)")


def evaluator_for(args, configs, device: str | None = None):
    """Validate model, configs and --windows cheaply (bad input fails before any model loads),
    then build the Evaluator (given `device` when the engine emulates per device)."""
    from engine.accuracy.evaluator import Evaluator
    from engine.models.loaders import model_spec
    from engine.models.shapes import check_context
    from engine.vocab.config import ModelConfig

    if args.windows < 1:
        raise UserError(f"--windows must be >= 1, not {args.windows}")
    from sweep.study.runner import check_torch_device

    try:
        check_torch_device(getattr(args, "torch_device", None))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    spec = model_spec(args.model, cache=args.cache_dir)  # cheap: unknown models and bad configs fail fast
    check_context(spec, args.prefill, args.decode, "--prefill + --decode")
    for c in configs:
        ModelConfig.parse(c, spec.n_layers, spec.name)
    lm_head = parse_lm_head(args.lm_head) if getattr(args, "lm_head", None) else None
    profile = getattr(args, "tt_metal", None)
    if profile is not None:
        from engine.vocab.profiles import PROFILES

        if profile not in PROFILES:
            raise UserError(f"--tt-metal {profile!r}: unknown profile; legal: {', '.join(PROFILES)}")
    return Evaluator(args.model, prefill=args.prefill, decode=args.decode, cache_dir=args.cache_dir,
                     windows=args.windows, device=device or "N150", lm_head=lm_head,
                     torch_device=getattr(args, "torch_device", None), profile=profile)


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate one config's accuracy (Top-1/Top-5, KLD statistics, perplexity) against the fp32 reference",
        description=__doc__,
    )
    add_eval_args(p)
    p.add_argument("--device", default="N150",
                   help="Wormhole system whose numerics are emulated (N150, N300, T3K): tensor-parallel "
                        "rounding of wo / w2 depends on it (default N150)")
    p.add_argument("--config", default="defaults",
                   help="preset (performance, accuracy, reference, defaults), config string "
                        "'precision_cfg = {...}, fidelity_cfg = {...}' (optionally '; decoders = {i: ...}') "
                        "or a path to a tt-metal decoder JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE",
                   help="run under an assumption switch (repeatable): " + _switches_help())
    p.add_argument("--assumptions", action="store_true",
                   help="the assumption band: the config under each alternative alone and all together, "
                        "with the Top-1 / Top-5 / KLD range")
    p.set_defaults(func=run)


def _switches_help() -> str:
    from engine.vocab.assumptions import ASSUMPTIONS

    return "; ".join(f"{a.name} = {a.default} (default) | {' | '.join(a.alternatives)}" for a in ASSUMPTIONS.values())


def parse_assume(items: list[str]) -> dict[str, str]:
    """['bfp_pack=double', ...] -> {'bfp_pack': 'double'}, checked against the switch table."""
    from engine.vocab.assumptions import resolve

    out = {}
    for item in items:
        name, sep, value = (t.strip() for t in item.partition("="))
        if not sep:
            raise UserError(f"--assume {item!r} needs NAME=VALUE, e.g. bfp_pack=double")
        out[name] = value
    try:
        resolve(out)
    except ValueError as exc:
        raise UserError(f"--assume: {exc}") from None
    return out


def run(args) -> int:
    assume = parse_assume(args.assume)
    ev = evaluator_for(args, [args.config], device=args.device)
    ev.set_assumptions(assume)
    r = ev.evaluate(ev.model_config(args.config))
    band = assumption_band(ev, args.config, assume, r) if args.assumptions else None
    if args.json:
        d = r.to_dict()
        d |= {"prefill": args.prefill, "decode": args.decode, "streamed": ev.stream,
              "assumed": ev.assumptions, "tt_metal": ev.profile}
        if band is not None:
            d["assumptions"] = band
        if ev.weight_cache is not None:
            d |= {"weight_cache_bytes": ev.weight_cache.size, "weight_cache_hits": ev.weight_cache.hits,
                  "weight_cache_quantized": ev.weight_cache.misses}
        print(json.dumps(d))
        return 0
    s = r.stats
    if r.windows > 1:
        print(f"{r.model} on {r.device}: {r.tokens} scored positions: {args.decode} teacher-forced decode steps "
              f"after a {args.prefill}-token prefill in each of {r.windows} windows")
    else:
        print(f"{r.model} on {r.device}: {r.tokens} teacher-forced decode steps after a {args.prefill}-token prefill")
    print(f"  config  {r.config}")
    print(f"  lm_head {r.lm_head[0]} + {r.lm_head[1]}")
    print(f"  tt-metal profile {ev.profile}")
    if ev.stream:
        print("  weights streamed layer by layer" + (f"; {ev.weight_cache.describe()}" if ev.weight_cache else ""))
    print(f"  Top-1 {r.top1:.1f}% [{r.top1_ci[0]:.1f}, {r.top1_ci[1]:.1f}]   "
          f"Top-5 {r.top5:.1f}% [{r.top5_ci[0]:.1f}, {r.top5_ci[1]:.1f}]  (95% Wilson)")
    if r.windows > 1:
        w = r.top1_windows
        print(f"  Top-1 per window {', '.join(f'{x:.1f}' for x in w)}  (range {min(w):.1f}-{max(w):.1f}, "
              f"sd {r.top1_window_sd:.2f})")
    print(f"  KLD mean {s['kld_mean']:.5f} +- {s['kld_se']:.5f}  median {s['kld_p50']:.5f}  p90 {s['kld_p90']:.5f}  "
          f"p99 {s['kld_p99']:.4f}  p99.9 {s['kld_p999']:.4f}  max {s['kld_max']:.4f} nats")
    print(f"  RMS dp {s['rms_dp']:.3f} +- {s['rms_dp_se']:.3f} %   same top p {s['same_top_p']:.2f} +- "
          f"{s['same_top_p_se']:.2f} %   perplexity {r.ppl:.3f} (reference {r.ref_ppl:.3f})   {r.seconds:.1f} s")
    if assume:
        print("  assumed " + ", ".join(f"{k} = {v}" for k, v in assume.items()))
    if band is not None:
        print_band(band)
    return 0


def assumption_band(ev, config: str, base: dict[str, str], result) -> dict:
    """The config under each run of engine.vocab.assumptions.band() (on top of `base`): per run
    Top-1 / Top-5 / KLD, and the range over all runs. `result` is the run at `base`."""
    from engine.vocab.assumptions import ASSUMPTIONS, band

    runs = []
    for label, changed in band():
        values = {**base, **changed}
        if not changed:
            r = result
        else:
            ev.set_assumptions(values)
            r = ev.evaluate(ev.model_config(config))
        runs.append({"label": label, "switches": ev.assumptions if changed else {**base}, "top1": r.top1,
                     "top5": r.top5, "kld": r.kld})
    ev.set_assumptions(base)
    rng = {m: [min(x[m] for x in runs), max(x[m] for x in runs)] for m in ("top1", "top5", "kld")}
    return {"switches": {a.name: {"default": a.default, "alternatives": list(a.alternatives), "what": a.what,
                                  "open_because": a.open_because} for a in ASSUMPTIONS.values()},
            "runs": runs, "range": rng}


def print_band(band: dict) -> None:
    base = band["runs"][0]
    print("  assumption band (rules no document or silicon result settles; engine.vocab.assumptions):")
    print(f"    {'run':<42} {'Top-1':>6} {'Top-5':>6} {'KLD':>9}   vs defaults")
    for x in band["runs"]:
        print(f"    {x['label']:<42} {x['top1']:6.1f} {x['top5']:6.1f} {x['kld']:9.5f}   "
              f"{x['top1'] - base['top1']:+5.1f} {x['top5'] - base['top5']:+5.1f} {x['kld'] - base['kld']:+.5f}")
    r = band["range"]
    print(f"    range: Top-1 {r['top1'][0]:.1f}-{r['top1'][1]:.1f}, Top-5 {r['top5'][0]:.1f}-{r['top5'][1]:.1f}, "
          f"KLD {r['kld'][0]:.5f}-{r['kld'][1]:.5f}")


def parse_lm_head(text: str) -> tuple[str, str]:
    """'bfp8,hifi2fp16' -> ('bfp8', 'hifi2fp16'), checked against the format and setting tables."""
    from engine.vocab.config import ConfigError, lm_head_of

    fmt, sep, fid = (t.strip() for t in text.partition(","))
    if not sep:
        raise ConfigError(f"--lm-head {text!r} needs FORMAT,FIDELITY, e.g. bfp8,hifi2fp16")
    return lm_head_of(fmt, fid)
