"""The assumption band (torch-free): every numerics rule that no document or silicon result settles
is a named switch with the engine's default and the plausible alternatives. `sweep eval
--assumptions` runs a config under each alternative alone and under all of them together, and
reports how far Top-1 / Top-5 / KLD move: how far the emulator's answer could move on hardware.

Adding a switch is one entry here plus the code that reads it (docs/NUMERICS.md lists each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Assumption:
    name: str
    default: str  # the engine's rule when nothing is said
    alternatives: tuple[str, ...]  # the other values hardware could plausibly have
    what: str  # the rule, in one line
    open_because: str  # what leaves it open
    requires: tuple[tuple[str, str], ...] = ()  # other switches' values without which it changes nothing


ASSUMPTIONS: dict[str, Assumption] = {a.name: a for a in (
    Assumption("bfp_pack", "precise", ("double",),
               "Bfp8_b / Bfp4_b outputs of compute ops (matmuls, eltwise, SiLU product, SDPA, norms, LM-head "
               "logits) rounded once (`precise`, as typecast or bfp8_pack_precise) or twice by the packer "
               "(`double`, engine.numerics.formats.gasket); typecasts (layer input, Q, the KV-cache fill) round once",
               "silicon rounds twice without bfp8_pack_precise (tt-metal issue 52155); which kernels of a "
               "given tt_transformers release set the flag is not settled here"),
    Assumption("gasket_ties", "away", ("even",),
               "the packer gasket's first rounding (with bfp_pack = double): ties away from zero or to even",
               "no document states the gasket's tie rule", requires=(("bfp_pack", "double"),)),
    Assumption("dest16_round", "even", ("away",),
               "a 16-bit dest's bf16 narrowing after each MVMUL (and Float16_b L1 accumulation): ties to "
               "even or away from zero",
               "the ISA model truncates 'approximately; real hardware rounds' (MatrixUnit.md WriteDstBF16)"),
    Assumption("argmax_ties", "first", ("last",),
               "the Top-1 / Top-5 argmax among equal (bfp8) logits: the lowest vocabulary index (torch) or "
               "the highest",
               "equal bfp8 logits are common; an on-device argmax's tie-break is not documented"),
)}


def resolve(given: Mapping[str, str] | None) -> dict[str, str]:
    """Every switch's value: the defaults overridden by `given`; ValueError naming the legal values."""
    out = {name: a.default for name, a in ASSUMPTIONS.items()}
    for name, value in (given or {}).items():
        a = ASSUMPTIONS.get(name)
        if a is None:
            raise ValueError(f"unknown assumption {name!r}; known: {', '.join(ASSUMPTIONS)}")
        if value not in (a.default, *a.alternatives):
            raise ValueError(f"assumption {name} = {value!r}; legal values: {', '.join((a.default, *a.alternatives))}")
        out[name] = value
    return out


def changed(values: Mapping[str, str]) -> dict[str, str]:
    """The switches of `values` that are not at their default."""
    return {k: v for k, v in resolve(values).items() if v != ASSUMPTIONS[k].default}


def band() -> list[tuple[str, dict[str, str]]]:
    """The runs of the band: (label, changed switches): the defaults, each alternative alone, and
    every switch at its first alternative together."""
    runs = [("defaults", {})]
    for a in ASSUMPTIONS.values():
        for alt in a.alternatives:
            label = f"{a.name}={alt}" + "".join(f" (with {k}={v})" for k, v in a.requires)
            runs.append((label, {**dict(a.requires), a.name: alt}))
    runs.append(("all alternatives", {a.name: a.alternatives[0] for a in ASSUMPTIONS.values()}))
    return runs


def key(values: Mapping[str, str]) -> str:
    """A suffix for evaluation keys ('' at the defaults), so results under other assumptions never pair."""
    c = changed(values)
    return "" if not c else "+assume:" + ",".join(f"{k}={v}" for k, v in sorted(c.items()))
