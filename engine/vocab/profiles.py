"""tt-metal releases as numerics profiles (torch-free): the rules that changed between the seed era
(whose PERF.md headers the committed reports reproduce) and the current tt_transformers, one row
each, one table (docs/NUMERICS.md cites each rule).

A profile sets defaults; an explicit `[numerics] silu` or an `--assume` switch still wins. Study
files say `[numerics] tt_metal = "seed" | "current"`, `sweep eval` says `--tt-metal`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    silu: str  # the SFPU SiLU (engine.vocab.fidelity.SILU_MODES)
    bfp_pack: str  # compute ops' block-format outputs: "precise" (one rounding) or "double" (the packer's)
    sdpa_max_bf16: bool  # with a 16-bit dest, S - max is held as bf16 before exp (sub_exp_block_bcast_cols_inplace)
    rmsnorm_hifi2: bool  # RMSNorm's x*x, the 1/N reduce, x*rsqrt and *gamma through HiFi2's phases (models/common/rmsnorm.py)
    about: str

    def assumptions(self, given=None) -> dict[str, str]:
        """The assumption switches under this profile: its packing rule as `bfp_pack`'s default,
        `given` (engine.vocab.assumptions) over it."""
        from engine.vocab.assumptions import resolve

        return resolve({"bfp_pack": self.bfp_pack, **(given or {})})


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("seed", silu="sfpu-piecewise", bfp_pack="precise", sdpa_max_bf16=False, rmsnorm_hifi2=False,
            about="the seed era: the tt-metal of the seed's PERF.md tables (the committed reports' numerics)"),
    Profile("current", silu="exact", bfp_pack="double", sdpa_max_bf16=True, rmsnorm_hifi2=True,
            about="current tt-metal: SiLU as x * sigmoid(x) (PR 31266), compute ops pack Bfp8_b through the "
                  "packer's double rounding (issue 52155; no bfp8_pack_precise in tt_transformers' configs), "
                  "SDPA with a 16-bit dest rounds S - max to bf16 before exp, RMSNorm at HiFi2 (fp32 dest) "
                  "with a bf16 1/N scaler"),
)}
DEFAULT = "seed"


def profile(name: str | None) -> Profile:
    """The profile of a name (None: the default); ValueError naming the legal ones."""
    key = DEFAULT if name is None else str(name)
    if key not in PROFILES:
        raise ValueError(f"unknown tt-metal profile {name!r}; legal: {', '.join(PROFILES)}")
    return PROFILES[key]
