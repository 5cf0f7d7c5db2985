"""Rewrite the README's SmolLM2 results table from reports/lt-pareto/points.csv (every committed
figure comes from the code as committed: run this after `sweep run studies/lt-pareto.toml`).

    python bench/readme_results.py            # rewrite README.md in place
    python bench/readme_results.py --check    # exit 1 if the README is stale
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = [  # (config in backticks, description); the config is what the row is joined on
    ("defaults", "bfp8 everywhere, hifi2"),
    ("performance", "ff1_3 bfp4 + lofi"),
    ("ff1_3: bfp4, ff2: bfp4, li_ff1_3: lofi, li_ff2: lofi", ""),
    ("ff1_3: bf16, ff2: bf16, li_ff1_3: hifi4, li_ff2: hifi4", ""),
    ("wo: bfp4, activation: bfp8, li_o_decode: lofi, li_o_prefill: lofi", ""),
    ("accuracy", "bf16 attention and KV cache, hifi4"),
]


def table() -> str:
    import pandas as pd

    from engine.models.loaders import model_spec
    from engine.vocab.config import ModelConfig

    df = pd.read_csv(ROOT / "reports" / "lt-pareto" / "points.csv")
    by_config = {c: r for c, r in zip(df["config"], df.to_dict("records"))}
    n = model_spec("smollm2-135m").n_layers
    out = ["| config (preset, or diff from tt-metal's seed defaults) | Top-1 (%) | Top-5 (%) | KLD (nats) | N150 t/s/u |",
           "|---|---|---|---|---|"]
    for cfg, what in ROWS:
        r = by_config[str(ModelConfig.parse(cfg, n, "smollm2-135m"))]
        kld = f"{r['kld']:.4f}" if r["kld"] < 0.1 else f"{r['kld']:.3f}"
        label = f"`{cfg}`" + (f" ({what})" if what else "")
        out.append(f"| {label} | {r['top1']:.1f} | {r['top5']:.1f} | {kld} | {r['speed:N150']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    pat = re.compile(r"\| config \(preset, or diff from tt-metal's seed defaults\).*?\n(?=\n)", re.S)
    if not pat.search(text):
        print("README.md has no results table to rewrite", file=sys.stderr)
        return 1
    new = pat.sub(lambda m: table() + "\n", text, count=1)
    if args.check:
        if new != text:
            print("README.md results table is stale: run python bench/readme_results.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
