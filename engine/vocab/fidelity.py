"""Math fidelity settings as data (torch-free): `Fidelity(phases, approx, fp32_dest, packer_l1_acc)`
records and `SETTINGS`, THE table of named settings (docs/NUMERICS.md).

The arithmetic they select (phased matmul, dest accumulation, SFPU exp/recip/SiLU) is
engine.numerics.fidelity; the config grammar, the study parser, the equivalence rules and the
performance model read this table.
"""
from __future__ import annotations

from dataclasses import dataclass

TILE_K = 32  # K elements per tile
SLICE_K = 16  # K elements per MVMUL (one dest rounding with a 16-bit dest)

#: SiLU modes (`[numerics] silu`): the SFPU's seed-era piecewise sigmoid, or x * sigmoid(x).
SILU_MODES = ("exact", "sfpu-piecewise")


@dataclass(frozen=True)
class Fidelity:
    """A compute-kernel setting: `phases` 1-4 multiplier phases (0 = exact fp32 operands),
    `approx` SFPU approximate mode (exp/recip only), `fp32_dest` fp32 (else bf16) dest
    accumulation, `packer_l1_acc` partial sums over K blocks accumulated by the packer in L1."""

    phases: int
    approx: bool
    fp32_dest: bool
    packer_l1_acc: bool

    def __post_init__(self):
        if not isinstance(self.phases, int) or isinstance(self.phases, bool) or not 0 <= self.phases <= 4:
            raise ValueError(f"phases must be an int 1-4 (0 = exact), got {self.phases!r}")
        for name in ("approx", "fp32_dest", "packer_l1_acc"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def interm_format(self) -> str:
        """The L1 buffer format of packer L1 accumulation (matmul program factories'
        interm0_data_format): Float32 with an fp32 dest, else Float16_b."""
        return "fp32" if self.fp32_dest else "bf16"


#: THE table of named settings (docs/NUMERICS.md): the six tt-metal names (with the
#: tt-metal enum member name), `hifi3` (3 phases, fp32 dest, packer L1 acc: hardware has it, no
#: tt-metal name) and `exact` (the emulator's reference: plain fp32 matmul, exact exp).
@dataclass(frozen=True)
class Setting:
    name: str  # config vocabulary value
    kernel: Fidelity
    tt_metal: bool  # a tt-metal MathFidelitySetting (may appear in decoder JSON)


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("lofi", Fidelity(1, False, False, True), True),
    Setting("hifi2", Fidelity(2, True, True, True), True),
    Setting("hifi2na", Fidelity(2, False, False, False), True),
    Setting("hifi2fp16", Fidelity(2, False, False, True), True),
    Setting("hifi3", Fidelity(3, False, True, True), False),
    Setting("hifi4", Fidelity(4, False, True, True), True),
    Setting("hifi4fp32", Fidelity(4, True, True, True), True),
    Setting("exact", Fidelity(0, False, True, False), False),
)}

EXACT = SETTINGS["exact"].kernel


def resolve(setting) -> Fidelity:
    """A `Fidelity` from a setting name (or an enum whose value is one) or a `Fidelity`."""
    if isinstance(setting, Fidelity):
        return setting
    name = getattr(setting, "value", setting)
    if isinstance(name, str) and name in SETTINGS:
        return SETTINGS[name].kernel
    raise ValueError(f"unknown fidelity setting {setting!r}; legal settings: {', '.join(SETTINGS)}")
