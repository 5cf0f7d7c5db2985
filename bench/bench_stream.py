"""Layer-streamed evaluation at the seed's model sizes: peak memory and seconds per trial.

For each model shape (engine.models.shapes: Llama3.2-1B, Llama3.2-3B, Llama3.1-8B; Llama3.1-70B cut to
a few layers) a random-weight Hugging Face checkpoint is written (engine.models.synthetic: bf16
safetensors shards, the byte tokenizer), then measured in FRESH processes, so each peak RSS
(VmHWM: getrusage's maxrss would carry the parent's over) is that phase's alone:
  reference   the streamed fp32 transformers reference over the window (computed and cached)
  trial cold  one trial of --config: every weight read, quantized and written to the disk cache
  trial warm  the same trial in a new process: quantized weights read from the disk cache
Trial time is reported as a ratio to the streamed reference's time in the same run (a busy
machine slows both). The 70B shape is measured at two cut depths; its per-layer memory is the
peak of the deeper cut, its time is extrapolated to the full depth from the per-layer difference.

    python bench/bench_stream.py                          # 1B, 3B, 8B, 70B cut; 512 + 511 tokens
    python bench/bench_stream.py --models Llama3.2-1B --prefill 128 --decode 127
    python bench/bench_stream.py --torch-device cuda      # the same on a GPU (prefetching)
    sweep bench stream [-- --models Llama3.2-1B]
Targets (issue 21): Llama3.1-8B under 8 GB peak RSS; 70B per-layer peak under 16 GB; trial time at
most 4x the streamed reference for bf16-dest configs (`defaults`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_8B_GB, TARGET_70B_LAYER_GB, TARGET_RATIO = 8.0, 16.0, 4.0
DEFAULT_MODELS = ["Llama3.2-1B", "Llama3.2-3B", "Llama3.1-8B", "Llama3.1-70B"]
CUT = {"Llama3.1-70B": (1, 2)}  # measured depths of shapes too big to write whole


def _child(args) -> None:
    """One phase in this (fresh) process; prints a JSON line."""
    from engine.accuracy.evaluator import Evaluator

    t0 = time.perf_counter()
    ev = Evaluator(args.dir, prefill=args.prefill, decode=args.decode, cache_dir=args.cache,
                   torch_device=args.torch_device)
    out = {"stream": ev.stream, "init_s": time.perf_counter() - t0}
    if args.child == "trial":
        t0 = time.perf_counter()
        r = ev.evaluate(args.config)
        out |= {"trial_s": time.perf_counter() - t0, "top1": r.top1, "kld": r.kld}
        if ev.weight_cache is not None:
            out |= {"cache_hits": ev.weight_cache.hits, "cache_misses": ev.weight_cache.misses,
                    "cache_gb": ev.weight_cache.size / 2**30}
    from engine.models.store import peak_rss_bytes

    out["peak_gb"] = peak_rss_bytes() / 2**30
    if args.torch_device and args.torch_device.startswith("cuda"):
        import torch

        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


def _phase(kind: str, d: Path, cache: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(d), "--cache", str(cache),
           "--prefill", str(a.prefill), "--decode", str(a.decode), "--config", a.config]
    if a.torch_device:
        cmd += ["--torch-device", a.torch_device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"bench_stream: the {kind} phase on {d.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(model: str, layers: int | None, a, work: Path) -> dict:
    from engine.models.synthetic import write_checkpoint

    name = model if layers is None else f"{model}-{layers}L"
    d, cache = work / name, work / f"{name}-cache"
    t0 = time.perf_counter()
    write_checkpoint(d, model, n_layers=layers)
    disk = sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**30
    from engine.models.shapes import shape_for

    row = {"model": model, "layers": layers or shape_for(model).n_layers, "disk_gb": disk, "write_s": time.perf_counter() - t0}
    print(f"{name}: {disk:.1f} GB written in {row['write_s']:.0f} s", file=sys.stderr, flush=True)
    try:
        ref = _phase("reference", d, cache, a)
        cold = _phase("trial", d, cache, a)
        warm = _phase("trial", d, cache, a)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    row |= {"stream": cold["stream"], "ref_s": ref["init_s"], "ref_peak_gb": ref["peak_gb"],
            "cold_s": cold["trial_s"], "cold_peak_gb": cold["peak_gb"], "warm_s": warm["trial_s"],
            "warm_peak_gb": warm["peak_gb"], "cache_gb": cold.get("cache_gb", 0.0),
            "warm_hits": warm.get("cache_hits", 0), "warm_misses": warm.get("cache_misses", 0),
            "top1": warm["top1"], "kld": warm["kld"], "window": a.prefill + a.decode,
            "ref_tokens": max(1024, a.prefill + a.decode + 1)}
    row |= {k: v for k, v in warm.items() if k == "gpu_peak_gb"}
    row["peak_gb"] = max(row["ref_peak_gb"], row["cold_peak_gb"], row["warm_peak_gb"])
    print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def extrapolate(rows: list[dict], model: str) -> dict:
    """The full-depth row of a cut model from its two measured depths (time linear in layers)."""
    from engine.models.shapes import shape_for

    (lo, hi), full = CUT[model], shape_for(model).n_layers
    r = {x["layers"]: x for x in rows if x["model"] == model}
    out = {"model": model, "layers": full, "extrapolated": True, "disk_gb": r[lo]["disk_gb"] + (full - lo) * (r[hi]["disk_gb"] - r[lo]["disk_gb"]) / (hi - lo)}
    for k in ("ref_s", "cold_s", "warm_s"):
        out[k] = r[lo][k] + (full - lo) * (r[hi][k] - r[lo][k]) / (hi - lo)
    out["peak_gb"] = max(r[lo]["peak_gb"], r[hi]["peak_gb"])  # independent of depth (the law)
    out["window"], out["ref_tokens"] = r[lo]["window"], r[lo]["ref_tokens"]
    out["peak_growth_per_layer_gb"] = (r[hi]["peak_gb"] - r[lo]["peak_gb"]) / (hi - lo)
    return out


def per_token_ratio(r: dict) -> float:
    """Trial seconds per token over the reference's seconds per token (the reference always runs
    max(1024, P + D + 1) tokens; at the default 512 + 511 the two run the same tokens)."""
    return (r["warm_s"] / r["window"]) / (r["ref_s"] / r["ref_tokens"])


def table(rows: list[dict], a, device: str) -> str:
    head = ("| Model shape | Layers | Checkpoint (GB) | Streamed | Peak RSS (GB) | Reference (s) | Trial cold (s) "
            "| Trial warm (s) | Trial / reference per token | Weight cache (GB) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ext = r.get("extrapolated")
        layers = f"{r['layers']}" + (" (extrapolated)" if ext else "")
        stream = "" if ext else ("yes" if r["stream"] else "no")
        cache = "" if ext else f"{r['cache_gb']:.1f}"
        lines.append(f"| {r['model']} | {layers} | {r['disk_gb']:.1f} | {stream} | {r['peak_gb']:.2f} | {r['ref_s']:.0f} | "
                     f"{r['cold_s']:.0f} | {r['warm_s']:.0f} | {per_token_ratio(r):.2f} | {cache} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """One line per missed target (issue 21's)."""
    out = []
    for r in rows:
        if r["model"] == "Llama3.1-8B" and r["peak_gb"] >= TARGET_8B_GB:
            out.append(f"MISSED: {r['model']} peak RSS {r['peak_gb']:.2f} GB >= {TARGET_8B_GB} GB")
        if r["model"] == "Llama3.1-70B" and r["peak_gb"] >= TARGET_70B_LAYER_GB:
            out.append(f"MISSED: {r['model']} ({r['layers']} layers) peak RSS {r['peak_gb']:.2f} GB >= {TARGET_70B_LAYER_GB} GB")
        if per_token_ratio(r) > TARGET_RATIO:
            out.append(f"MISSED: {r['model']} ({r['layers']} layers) trial {per_token_ratio(r):.2f}x the reference "
                       f"per token > {TARGET_RATIO}x")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=511)
    ap.add_argument("--config", default="defaults", help="the trial's config (default: %(default)s, bf16 dest)")
    ap.add_argument("--torch-device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the table and the JSON rows here (e.g. reports/stream)")
    ap.add_argument("--quick", action="store_true", help="Llama3.2-1B only, 128 + 127 tokens")
    ap.add_argument("--child", choices=["reference", "trial"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a)
        return 0
    if a.quick:
        a.models, a.prefill, a.decode = ["Llama3.2-1B"], 128, 127
    from engine.models.shapes import shape_for
    from engine.vocab.devices import normalise_device  # noqa: F401 - the engine imports cleanly before hours of work

    for m in a.models:
        shape_for(m)  # an unknown name fails before anything is written
    device = a.torch_device or "cpu"
    if device.startswith("cuda"):
        import torch

        device = f"{device} ({torch.cuda.get_device_name(0)})"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ttsweep-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for m in a.models:
            for layers in CUT.get(m, (None,)):
                rows.append(measure(m, layers, a, work))
            if m in CUT:
                rows.append(extrapolate(rows, m))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch device {device}"
    text = (f"Window {a.prefill} + {a.decode} tokens, config `{a.config}`; {machine}.\n\n" + table(rows, a, device) + "\n")
    misses = targets(rows)
    text += "\n" + "\n".join(misses or ["Every target met."]) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-stream.md").write_text(text)
        (out / "bench-stream.json").write_text(json.dumps({"prefill": a.prefill, "decode": a.decode, "config": a.config,
                                                            "device": device, "rows": rows}, indent=2) + "\n")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
