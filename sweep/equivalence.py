"""Configs whose emulated numerics are provably identical, and configs dominated a priori.

`numerics_key(config)` is equal for two configs exactly when this module can prove that every
op computes bit-identical results; it is conservative (a different key does not prove different
numerics). The facts used (engine.numerics.fidelity, docs/NUMERICS.md):

* Fidelity phase p multiplies a slice of the activation (SrcB) by a slice of the weight (SrcA):
  phase 0 xh*wh, 1 xh*wl, 2 xl*wh, 3 xl*wl (xh = hidden one + top 6 bits, xl = the 7th bit;
  wh = hidden one + top 4 bits, wl = bits 5-7). LoFi runs phase 0, HiFi2 0-1, HiFi3 0-2, HiFi4 0-3.
* A slice that is zero for every element contributes exact zeros:
  - a weight format with <= 4 fraction bits (bfp4) has wl == 0;
  - an activation format with <= 6 fraction bits (bfp8, bfp4) has xl == 0.
* 16-bit dest: each phase's 16-wide slice partial is added and rounded, dest <- bf16(dest + P).
  A phase whose partials are exact zeros leaves dest unchanged (bf16(d + 0) = d for a bf16 d), so
  it is dropped from the key: the key is the sequence of remaining phase products, in order.
* fp32 dest: the emulator sums the phases' products in one matmul of combined operands
  (HiFi2 xh @ w7, HiFi4 x7 @ w7, HiFi3 x7 @ w7 - xl @ wl, LoFi xh @ wh): with w7 == wh or
  x7 == xh substituted, and a product with a zero factor dropped, equal term lists are equal
  matmul calls on equal operands.
* fp32 dest and packer L1 accumulation change the accumulation (K-block partials): both stay in
  the key. Approx mode changes only SFPU functions: nothing in a linear, but the SDPA softmax's
  reciprocal follows it (and its exp too with `sdpa_exp_approx`), so the SDPA ops keep it.
* The activation (SrcB) operand's format per op (tt_transformers' dtypes, engine.models.model):
  li_qkv_* and li_ff1_3 read a norm output (the forced activation, else bf16); li_ff2 reads
  SiLU(w1)*w3 (the activation, else bfp8); li_o_prefill reads the prefill SDPA output (Q's
  dtype: the activation, else bfp8); li_o_decode reads bf16 (decode SDPA output); the SDPA ops
  read Q and the bf16 softmax P, so they count as bf16. fp32 operands (full-precision mode) and
  the emulator's `exact` keep their raw setting in the key (never merged).
* The device's tensor-parallel layout changes the rounding of wo and w2 (per-chip partials rounded
  and summed in the output dtype), so `numerics_key(..., layout=(tp, wo_split))` keeps it.

Precisions themselves always stay in the key. A per-layer config's key is the tuple of its
layers' keys. tests/test_equivalence.py checks every merge against the engine with torch.equal.

"Dominated a priori": among configs with the same key the accuracy is identical, so the one(s)
that are no slower on any device (predicted by `engine.perf.model`; by phase counts when the perf
model cannot price a config) dominate; a grid runs only those (`representatives`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

from engine.vocab.config import Config, FidelitySetting, ModelConfig, OpGroup, Precision, TensorGroup
from engine.vocab.ops import HELD, OPS, src_b_dtype

_MATMUL_OPS = {o.fidelity: o for o in OPS.values() if o.fidelity}  # op group value -> its row of the op table

#: The weight (SrcA) operand of each op group (engine.vocab.ops).
SRC_A: dict[OpGroup, TensorGroup] = {OpGroup(g): TensorGroup(o.weight) for g, o in _MATMUL_OPS.items()}
SDPA_OPS = tuple(OpGroup(g) for g, o in _MATMUL_OPS.items() if o.second_src_b)

#: Each op's activation operand when `activation` is mixed (None), for the ops a forced activation
#: replaces it in (engine.vocab.ops; the norm-fed ops read the held bf16 layer input).
_SRC_B_MIXED: dict[OpGroup, Precision] = {
    OpGroup(g): Precision("bf16" if o.src_b == HELD else o.src_b)
    for g, o in _MATMUL_OPS.items() if o.src_b_forced and not o.second_src_b
}


def _src_b_precision(cfg: Config, op: OpGroup) -> Precision:
    """The format of `op`'s activation (SrcB) operand as far as it is known to lack bits: the op
    table's, under the layer's activation; an op with a second matmul (SDPA's P @ V reads the bf16
    softmax P) counts as that one's bf16."""
    row = _MATMUL_OPS[op.value]
    if row.second_src_b:
        return Precision(row.second_src_b)
    act = None if cfg.activation is None else cfg.activation.value
    return Precision(src_b_dtype(op.value, act))


#: Phase p's (SrcB slice, SrcA slice).
PHASE_SLICES = (("xh", "wh"), ("xh", "wl"), ("xl", "wh"), ("xl", "wl"))

#: The fp32-dest emulator's combined products per phase count (a second product is SUBTRACTED).
FP32_TERMS = {
    1: (("xh", "wh"),),
    2: (("xh", "w7"),),
    3: (("x7", "w7"), ("xl", "wl")),
    4: (("x7", "w7"),),
}


def op_key(cfg: Config, op: OpGroup, sdpa_exp_approx: bool = False) -> tuple:
    """What determines `op`'s results in `cfg` beyond the precisions (which are keyed separately):
    the products that can be non-zero (see the module docstring), the dest and packer flags, and
    for SDPA the approx flag."""
    f = cfg.fidelity(op)
    a = cfg.precision(SRC_A[op])
    b = _src_b_precision(cfg, op)
    if f is FidelitySetting.EXACT or Precision.FP32 in (a, b):
        return ("raw", f.value)
    k = f.kernel
    a_low = a.format.fraction_bits > 4  # SrcA's bits 5-7 can be nonzero
    b_low = b.format.fraction_bits > 6  # SrcB's 7th bit can be nonzero
    sub = {"w7": "w7" if a_low else "wh", "x7": "x7" if b_low else "xh"}
    zero = {"wl"} if not a_low else set()
    zero |= {"xl"} if not b_low else set()
    terms = PHASE_SLICES[:k.phases] if not k.fp32_dest else FP32_TERMS[k.phases]
    kept = tuple((sub.get(xs, xs), sub.get(ws, ws)) for xs, ws in terms if xs not in zero and ws not in zero)
    key: tuple = (kept, k.fp32_dest, k.packer_l1_acc)
    if op in SDPA_OPS:
        key += (k.approx, sdpa_exp_approx)
    return key


def layer_key(cfg: Config, sdpa_exp_approx: bool = False) -> tuple:
    """Numerics key of one decoder layer's config."""
    precisions = tuple((p.value if (p := cfg.precision(g)) is not None else "mixed") for g in TensorGroup)
    return precisions + tuple(op_key(cfg, op, sdpa_exp_approx) for op in OpGroup)


def numerics_key(config: Config | ModelConfig, model_spec=None, sdpa_exp_approx: bool = False,
                 layout: tuple[int, int] = (1, 1)) -> Hashable:
    """Equal for configs whose emulated numerics are provably identical (per-layer tuple);
    `layout` = (tensor-parallel chips, chips wo is split over) of the device evaluated."""
    del model_spec  # the rules do not depend on the model's shapes
    layers = (config,) if isinstance(config, Config) else config.layers
    key = tuple(layer_key(c, sdpa_exp_approx) for c in layers)
    return key if tuple(layout) == (1, 1) else key + (("layout",) + tuple(layout),)


def numerics_digest(config: Config | ModelConfig, model_spec=None, layout: tuple[int, int] = (1, 1)) -> str:
    """A short stable string of `numerics_key` (stored as the trial user attribute `numerics_key`)."""
    return hashlib.sha1(repr(numerics_key(config, model_spec, layout=layout)).encode()).hexdigest()[:16]


def phase_vector(config: Config | ModelConfig) -> tuple[int, ...]:
    """Fidelity phases per (layer, op): the a-priori cost of a config."""
    layers = (config,) if isinstance(config, Config) else config.layers
    out = []
    for c in layers:
        for op in OpGroup:
            phases = c.fidelity(op).kernel.phases
            out.append(phases if phases else 4)
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


