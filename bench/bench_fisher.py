"""Fisher sensitivity benchmark: `engine.accuracy.fisher.fisher_profile` for one probe per decoder layer (a
group change of the base config, default ff1_3 -> bfp4 with li_ff1_3 -> lofi) on SmolLM2-135M, as
a RATIO to one warm `Evaluator.evaluate(base)` measured in the same process (minimum of `--repeat`
runs each). Target: the profile costs at most a quarter of what measuring the same probes costs
(probes x one trial). Prints each probe's Fisher delta; `--measure` also runs every probe as a
whole trial and prints the measured delta-KLD next to it and the Spearman rank correlation.

    python bench/bench_fisher.py                           # 128 + 127 tokens, ff1_3 probes
    python bench/bench_fisher.py --prefill 512 --decode 511 --measure
    python bench/bench_fisher.py --model tiny-llama --quick
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.accuracy.evaluator import Evaluator  # noqa: E402
from engine.accuracy.fisher import fisher_profile  # noqa: E402
from engine.vocab.config import Config, ConfigError, ModelConfig  # noqa: E402

TARGET_SHARE = 0.25  # of probes x one trial


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=127)
    ap.add_argument("--base", default="defaults", help="base config (preset or config string)")
    ap.add_argument("--change", default="precision_cfg = {ff1_3: bfp4}, fidelity_cfg = {li_ff1_3: lofi}",
                    help="the change every probe makes to its layer's base config (config string)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help="also run each probe as a whole trial (slow)")
    ap.add_argument("--quick", action="store_true", help="32 + 31 tokens, one repeat")
    a = ap.parse_args(argv)
    if a.quick:
        a.prefill, a.decode, a.repeat = 32, 31, 1
    ev = Evaluator(a.model, prefill=a.prefill, decode=a.decode)
    base = ev.model_config(a.base)
    try:
        probes = [(i, Config.parse(a.change, base[i])) for i in range(base.n_layers)]
    except ConfigError as exc:
        ap.error(f"--change: {exc}")
    ev.evaluate(base)  # warm: the base's weights quantized once
    fisher_profile(ev, base, probes[:1])  # warm: the probe's weights and the reference model
    t_eval, res = timed(lambda: ev.evaluate(base), a.repeat)
    t_fisher, fp = timed(lambda: fisher_profile(ev, base, probes), a.repeat)
    n = len(probes)
    share = t_fisher / (n * t_eval)
    print(f"{a.model} P{a.prefill} D{a.decode}, base {a.base} (KLD {res.kld:.5f}), {n} probes: {a.change}")
    print(f"one evaluate: {t_eval:.2f} s; fisher_profile: {t_fisher:.2f} s "
          f"(backward {fp.seconds_backward:.2f} s, layer runs {fp.seconds_probes:.2f} s)")
    print(f"fisher / one evaluate = {t_fisher / t_eval:.2f}x; fisher / measuring the {n} probes = {share:.3f} "
          f"(target <= {TARGET_SHARE}); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    measured = []
    if a.measure:
        for i, cfg in probes:
            layers = list(base.layers)
            layers[i] = cfg
            measured.append(ev.evaluate(ModelConfig(tuple(layers))).kld - res.kld)
    print("layer  fisher_delta  base_score" + ("  measured_dKLD" if measured else ""))
    for k, (i, _) in enumerate(probes):
        extra = f"  {measured[k]:+.6f}" if measured else ""
        print(f"{i:5d}  {fp.deltas[k]:+.6e}  {fp.base[i]:.6e}{extra}")
    if measured:
        from scipy.stats import spearmanr

        rho = spearmanr(fp.deltas, measured)
        print(f"Spearman rho (fisher delta vs measured delta-KLD) = {rho.statistic:.3f} (p = {rho.pvalue:.2g})")
    return 0 if share <= TARGET_SHARE else 1


if __name__ == "__main__":
    sys.exit(main())
