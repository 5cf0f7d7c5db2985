"""Configs whose emulated numerics are provably identical, and configs dominated a priori.

`numerics_key(config)` is equal for two configs exactly when this module can prove that every
op computes bit-identical results; it is conservative (a different key does not prove different
numerics). The facts used (tt-numerics.md section 3):

* A fidelity phase multiplies a slice of the weight (SrcA) significand by a slice of the
  activation (SrcB) significand: phases 0 and 2 use SrcA's hidden one + top 4 mantissa bits,
  phases 1 and 3 SrcA's next 3 bits; phases 0 and 1 use SrcB's hidden one + top 6 bits, phases
  2 and 3 SrcB's 7th bit. LoFi runs phase 0, HiFi2 phases 0-1, HiFi3 0-2, HiFi4 0-3.
* A phase whose slice is zero for every element adds exact zeros, so it can be dropped:
  - bfp4 values have at most 2 fraction bits: SrcA's "next 3 bits" are zero, phases 1 and 3
    vanish (LoFi == HiFi2 and HiFi3 == HiFi4 on the phase side);
  - bfp8 values have at most 6 fraction bits and bf16 7, so HiFi2 already holds all weight bits
    (phases 1/3 still matter for them: they carry mantissa bits 5-7);
  - an activation stored as bfp8 or bfp4 has no 7th mantissa bit: phases 2 and 3 vanish
    (HiFi2 == HiFi3 == HiFi4 for that op). The only such SrcB operand in the config vocabulary
    is the SiLU(w1)*w3 product feeding w2 under activation `mixed`, `bfp8` or `bfp4`. Every other
    SrcB operand (norm outputs, attention outputs, softmax P) is treated as bf16 (7th bit set).
* The key follows the emulator's arithmetic (engine.fidelity), which must reproduce it bit for
  bit: HiFi4 is one product x7 @ w7; HiFi3 is x7 @ w7 - lo(x) @ (w7 - hi(w)), whose second
  product is exactly zero for bfp4 weights (then HiFi3 == HiFi4) or for activations without a
  7th bit (then HiFi3 == HiFi2). tests/test_equivalence.py checks every merge against the engine
  with torch.equal.
* fp32 dest accumulation and packer L1 accumulation change results: they stay in the key.
  Approx mode changes only the vector unit's exp/reciprocal, never a matmul, and tt_transformers
  runs SDPA's exp in exact mode (so does engine.model by default): approx is dropped from the key
  (hifi4 == hifi4fp32 everywhere) unless the model opts into the SFPU exp
  (`sdpa_exp_approx=True`), in which case it stays in the key of the SDPA ops.
* SDPA: K and V (SrcA) are in the kv_cache format, Q and P on SrcB (P treated as bf16).
* fp32 operands (emulator only) use a different slice split, and the emulator's `exact`
  setting is plain fp32 math: such ops keep their raw setting in the key (never merged).

Precisions themselves always stay in the key. A per-layer config's key is the tuple of its
layers' keys.

"Dominated a priori": among configs with the same key the accuracy is identical, so the one(s)
that are no slower on any device (predicted by `engine.perf`; by phase counts when the perf
model cannot price a config) dominate; a grid runs only those (`representatives`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

from engine.config import Config, FidelitySetting, ModelConfig, OpGroup, Precision, TensorGroup


@dataclass(frozen=True)
class KernelSettings:
    phases: int  # math fidelity phases
    approx: bool  # SFPU approx mode (exp / reciprocal)
    fp32_dest: bool  # fp32 dest accumulation
    packer_l1: bool  # packer L1 accumulation


#: The compute-kernel settings each fidelity name stands for (tt-numerics.md section 1).
#: HiFi3 is the sweep's extension: 3 phases, fp32 dest, packer L1 acc, approx off.
SETTINGS: dict[FidelitySetting, KernelSettings] = {
    FidelitySetting.LOFI: KernelSettings(1, False, False, True),
    FidelitySetting.HIFI2: KernelSettings(2, True, True, True),
    FidelitySetting.HIFI2_NA: KernelSettings(2, False, False, False),
    FidelitySetting.HIFI2_FP16: KernelSettings(2, False, False, True),
    FidelitySetting.HIFI3: KernelSettings(3, False, True, True),
    FidelitySetting.HIFI4: KernelSettings(4, False, True, True),
    FidelitySetting.HIFI4_FP32: KernelSettings(4, True, True, True),
}

#: Mantissa fraction bits a value in each format can carry after unpacking (bf16-style data).
FRACTION_BITS = {Precision.BFP4: 2, Precision.BFP8: 6, Precision.BF16: 7}

#: The weight (SrcA) operand of each op group.
SRC_A: dict[OpGroup, TensorGroup] = {
    OpGroup.LI_FF1_FF3: TensorGroup.FF1_FF3,
    OpGroup.LI_FF2: TensorGroup.FF2,
    OpGroup.LI_QKV_DECODE: TensorGroup.WQKV,
    OpGroup.LI_QKV_PREFILL: TensorGroup.WQKV,
    OpGroup.LI_O_DECODE: TensorGroup.WO,
    OpGroup.LI_O_PREFILL: TensorGroup.WO,
    OpGroup.SDPA_DECODE: TensorGroup.KV_CACHE,
    OpGroup.SDPA_PREFILL: TensorGroup.KV_CACHE,
}
SDPA_OPS = (OpGroup.SDPA_DECODE, OpGroup.SDPA_PREFILL)


def _settings(f: FidelitySetting) -> KernelSettings | None:
    return SETTINGS.get(f)


def _src_b_precision(cfg: Config, op: OpGroup) -> Precision:
    """The format of the activation (SrcB) operand, as far as it is known to lack bits.

    Only w2's input (the SiLU(w1)*w3 product) has a config-given block format: bfp8 under
    activation `mixed`, else the activation precision. Everything else counts as bf16.
    """
    if op is OpGroup.LI_FF2:
        act = cfg.activation
        return Precision.BFP8 if act is None else act
    return Precision.BF16


#: The operand pairs whose products the emulator sums for each phase count (engine.fidelity):
#: x = activation (SrcB): xh = hidden one + top 6 bits, x7 = all 7 bits, xl = x7 - xh (bit 7);
#: w = weight (SrcA): wh = hidden one + top 4 bits, w7 = all 7 bits, wl = w7 - wh (bits 5-7).
#: HiFi3 = xh @ w7 + xl @ wh is computed as x7 @ w7 - xl @ wl (the second product subtracted).
TERMS = {
    1: (("xh", "wh"),),
    2: (("xh", "w7"),),
    3: (("x7", "w7"), ("xl", "wl")),
    4: (("x7", "w7"),),
}


def op_key(cfg: Config, op: OpGroup, sdpa_exp_approx: bool = False) -> tuple:
    """What determines `op`'s results in `cfg` beyond the precisions (which are keyed separately).

    The phases become the emulator's operand products (`TERMS`) with the slices that are provably
    equal substituted: a weight with <= 4 fraction bits has w7 == wh and wl == 0; an activation
    with <= 6 fraction bits has x7 == xh and xl == 0. A product with a zero factor is dropped
    (adding or subtracting exact zeros changes nothing).
    """
    f = cfg.fidelity(op)
    ks = _settings(f)
    a = cfg.precision(SRC_A[op])
    b = _src_b_precision(cfg, op)
    if ks is None or ks.phases not in TERMS or a not in FRACTION_BITS or b not in FRACTION_BITS:
        return ("raw", f.value)
    a_low = FRACTION_BITS[a] > 4  # SrcA's "next 3 bits" can be nonzero
    b_low = FRACTION_BITS[b] > 6  # SrcB's 7th bit can be nonzero
    terms = []
    for xs, ws in TERMS[ks.phases]:
        if not a_low:
            if ws == "wl":
                continue
            if ws == "w7":
                ws = "wh"
        if not b_low:
            if xs == "xl":
                continue
            if xs == "x7":
                xs = "xh"
        terms.append((xs, ws))
    key: tuple = (tuple(terms), ks.fp32_dest, ks.packer_l1)
    if op in SDPA_OPS and sdpa_exp_approx:
        key += (ks.approx,)
    return key


def layer_key(cfg: Config, sdpa_exp_approx: bool = False) -> tuple:
    """Numerics key of one decoder layer's config."""
    precisions = tuple((p.value if (p := cfg.precision(g)) is not None else "mixed") for g in TensorGroup)
    return precisions + tuple(op_key(cfg, op, sdpa_exp_approx) for op in OpGroup)


def numerics_key(config: Config | ModelConfig, model_spec=None, sdpa_exp_approx: bool = False) -> Hashable:
    """Equal for configs whose emulated numerics are provably identical (per-layer tuple)."""
    del model_spec  # the rules do not depend on the model's shapes
    if isinstance(config, Config):
        return (layer_key(config, sdpa_exp_approx),)
    return tuple(layer_key(c, sdpa_exp_approx) for c in config.layers)


def numerics_digest(config: Config | ModelConfig, model_spec=None) -> str:
    """A short stable string of `numerics_key` (stored as the trial user attribute `numerics_key`)."""
    return hashlib.sha1(repr(numerics_key(config, model_spec)).encode()).hexdigest()[:16]


def phase_vector(config: Config | ModelConfig) -> tuple[int, ...]:
    """Fidelity phases per (layer, op): the a-priori cost of a config."""
    layers = (config,) if isinstance(config, Config) else config.layers
    out = []
    for c in layers:
        for op in OpGroup:
            ks = _settings(c.fidelity(op))
            out.append(ks.phases if ks else 4)
    return tuple(out)


@dataclass
class Reduction:
    """The outcome of `representatives`: which configs to run, which were skipped and why."""

    keep: list[int]  # indices into the input, in input order
    skipped: dict[int, int]  # skipped index -> index of a kept config with the same numerics

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def representatives(
    configs: Sequence[ModelConfig | Config],
    cost: Callable[[ModelConfig | Config], Sequence[float] | None] | None = None,
) -> Reduction:
    """Drop configs dominated a priori: same numerics key and no faster on any cost component.

    `cost(config)` returns a vector to minimise (e.g. per device: -speed, ttft) or None when it
    cannot price the config; then (and on exact ties) the phase vector decides: a config with
    at least as many phases on every op and more on one is dominated; among configs with equal
    cost the first in input order is kept.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(numerics_key(c), []).append(i)
    keep: list[int] = []
    skipped: dict[int, int] = {}
    for members in groups.values():
        if len(members) == 1:
            keep.extend(members)
            continue
        costs = {i: (cost(configs[i]) if cost else None) for i in members}
        use_perf = all(v is not None for v in costs.values())
        phases = {i: phase_vector(configs[i]) for i in members}

        def dominates(j: int, i: int) -> bool:
            if use_perf:
                cj, ci = tuple(costs[j]), tuple(costs[i])
                if cj != ci:
                    return all(x <= y for x, y in zip(cj, ci))
            pj, pi = phases[j], phases[i]
            if pj != pi:
                return all(x <= y for x, y in zip(pj, pi))
            return j < i  # identical cost and phases: keep the first

        for i in members:
            better = [j for j in members if j != i and dominates(j, i)]
            if better:
                # point at a kept member: follow the chain to a non-dominated one
                j = better[0]
                seen = {i}
                while True:
                    nxt = [k for k in members if k != j and dominates(k, j)]
                    if not nxt or nxt[0] in seen:
                        break
                    seen.add(j)
                    j = nxt[0]
                skipped[i] = j
            else:
                keep.append(i)
    keep.sort()
    return Reduction(keep, skipped)


