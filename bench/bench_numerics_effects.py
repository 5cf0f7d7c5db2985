"""What each tt_transformers numerics rule does to accuracy: SmolLM2-135M trials (512 + 511) with the
engine as committed and with ONE rule reverted to the simpler emulation it replaced, per config.

    python bench/bench_numerics_effects.py [--configs defaults performance ...] [--prefill 512 --decode 511]

Rules reverted (one at a time): the LM head's 16-bit dest (hifi2 instead of hifi2fp16), the SFPU's
piecewise SiLU (exact SiLU), per-op K blocks (one block per matmul), flash SDPA over K chunks (one
whole-row chunk), bf16 RoPE (fp32 tables, one rounding), Meta q/k layout (Hugging Face order).
Prints Top-1, Top-5 and KLD per (config, rule) and the change against the committed engine.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import engine.models.model as em  # noqa: E402
from engine.accuracy.evaluator import Evaluator  # noqa: E402
from engine.models import programs  # noqa: E402


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _one_block(spec, tp=1, prefill=False, topology="line"):
    programs.check_tp(spec, tp)
    return programs.Blocks(None, None, None, None, None)


def _rope_fp32(self, x, rope, fmt):  # the previous emulation: fp32 tables, one rounding
    cos, sin = rope
    M, nh, D = x.shape
    swapped = x.reshape(M, nh, D // 2, 2).flip(-1).reshape(M, nh, D)
    return x * cos + swapped * sin if fmt == em.FULL else em.rnd(x * cos + swapped * sin, fmt)


_TABLE = em.Model._table


def _table_fp32(self, long, need, fmt):
    return _TABLE(self, long, need, em.FULL)


def _hf_layout(w, head_dim):  # q/k rows left in Hugging Face order, RoPE pairs (i, i + D/2)
    return w


def _rope_halves(self, x, rope, fmt):
    cos, sin = rope
    M, nh, D = x.shape
    # tables in pair order (2i, 2i+1): take frequency i for both halves of the HF layout
    c = torch.cat([cos[..., 0::2], cos[..., 0::2]], -1)
    s = torch.cat([sin[..., 0::2], -sin[..., 0::2]], -1)
    swapped = x.reshape(M, nh, 2, D // 2).flip(-2).reshape(M, nh, D)
    return em.rnd(em.rnd(x * c, fmt) + em.rnd(swapped * s, fmt), fmt) if fmt != em.FULL else x * c + swapped * s


VARIANTS = {
    "as committed": (),
    "LM head fp32 dest (hifi2)": ("lm_head",),
    "exact SiLU": ("silu",),
    "one K block per matmul": ((programs, "blocks", _one_block),),
    "whole-row SDPA (one chunk)": ((em.Model, "_chunk", lambda self, prefill, L, full: L),),
    "fp32 RoPE tables, one rounding": ((em.Model, "_rope_apply", _rope_fp32), (em.Model, "_table", _table_fp32)),
    "Hugging Face q/k layout": ((em, "to_meta", _hf_layout), (em.Model, "_rope_apply", _rope_halves)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", nargs="*", default=["defaults", "performance"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=511)
    args = ap.parse_args(argv)
    print(f"{'config':<14} {'variant':<32} {'top1':>6} {'top5':>6} {'kld':>8} {'d top1':>7} {'d kld':>8}")
    for cfg in args.configs:
        base = None
        for name, patches in VARIANTS.items():
            kwargs = {}
            if "lm_head" in patches:
                kwargs["lm_head"] = ("bfp8", "hifi2")
            if "silu" in patches:
                kwargs["silu"] = "exact"
            with contextlib.ExitStack() as stack:
                for p in patches:
                    if isinstance(p, tuple):
                        stack.enter_context(patched(*p))
                ev = Evaluator(args.model, prefill=args.prefill, decode=args.decode, **kwargs)
                r = ev.evaluate(cfg)
            base = base or r
            print(f"{cfg[:14]:<14} {name:<32} {r.top1:6.2f} {r.top5:6.2f} {r.kld:8.5f} {r.top1 - base.top1:+7.2f} "
                  f"{r.kld - base.kld:+8.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
