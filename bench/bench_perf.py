"""Cost of the metadata path and of the performance model, as RATIOS to work measured in the same run.

    python bench/bench_perf.py [--quick]
    sweep bench perf

- `loaders.model_spec` reads a GGUF header only (no tensor data, vocabulary strings skipped
  unread): its time against a full `loaders.load` of the same file. Target: < 10%.
- `perf.predict` runs once per device for every trial: its time per call (Llama3.1-70B on TG with
  80 per-layer configs, batch 32, 4096-token prompt; Llama3.1-8B on N300 with the performance
  preset; a chunked 64K prompt and a DP=32 Galaxy, both with prediction intervals) against one accuracy trial of the same model (512 + 511 tokens, defaults). Target: < 1%.
Minima over repeats after a warm-up call on both sides, so a busy shared machine disturbs both alike.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_numerics import best  # noqa: E402  (minimum after one warm-up call)
from engine.accuracy.evaluator import Evaluator  # noqa: E402
from engine.models import loaders
from engine.perf import model as perf  # noqa: E402
from engine.vocab.config import Config, ModelConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="GGUF or HF model for the header timing")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=511)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a 128 + 127 token trial as the baseline")
    args = ap.parse_args(argv)
    if args.quick:
        args.prefill, args.decode = 128, 127
    ok = True

    header = best(lambda: loaders.model_spec(args.model), args.repeat)
    full = best(lambda: loaders.load(args.model), 2)
    ratio = header / full
    ok &= ratio < 0.10
    print(f"model_spec({args.model}) {header * 1e3:.1f} ms vs full load {full:.2f} s: {ratio:.2%} "
          f"({'meets' if ratio < 0.10 else 'MISSES'} the < 10% target)")

    big = ModelConfig(tuple(Config(ff2=("bfp4" if i % 2 else "bfp8")) for i in range(80)))
    cases = [("Llama3.1-70B TG, 80 layer configs, batch 32, prefill 4096",
              lambda: perf.predict("Llama3.1-70B", "TG", big, batch=32, prefill=4096)),
             ("Llama3.1-8B N300 performance", lambda: perf.predict("Llama3.1-8B", "N300", "performance")),
             ("Llama3.1-8B N150 64K prompt in 16 chunks, with intervals",
              lambda: perf.predict("Llama3.1-8B", "N150", "performance", prefill=65536)),
             ("Llama3.2-1B TG DP=32 batch 32, with intervals",
              lambda: perf.predict("Llama3.2-1B", "TG", "performance", dp=32, batch=32))]
    ev = Evaluator(args.model, prefill=args.prefill, decode=args.decode)
    mc = ev.model_config("defaults")
    trial = best(lambda: ev.evaluate(mc), 2)
    print(f"baseline: one {args.model} trial ({args.prefill} + {args.decode} tokens, defaults) {trial:.2f} s")
    for label, fn in cases:
        t = best(fn, args.repeat * 4)
        r = t / trial
        ok &= r < 0.01
        print(f"predict {label}: {t * 1e3:.2f} ms per call, {r:.3%} of the trial "
              f"({'meets' if r < 0.01 else 'MISSES'} the < 1% target)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
