"""Wormhole number formats as data (torch-free): `Format` records in `FORMATS`, one entry per format.

The ops on them (quantize, pack, unpack) are engine.numerics.formats; this table is what the
config grammar, the study parser and the performance model's byte counts read (docs/NUMERICS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

BLOCK = 16  # elements sharing one exponent
TILE = 32  # tile side
FACE = 16  # face side
#: host: ttnn.from_torch (weights); device: one packer rounding, as ttnn.typecast (and any op with
#: bfp8_pack_precise) writes; packer: the packer's double rounding (its gasket first rounds each
#: element to the block format's magnitude width at its own exponent, then the alignment shift
#: rounds again), as matmul / binary ops / clone write bfp8 without bfp8_pack_precise.
ROUNDINGS = ("host", "device", "packer")


@dataclass(frozen=True)
class Format:
    """A number format. `mag_bits` is the per-element magnitude width of a block format (None for
    the scalar formats); `tile_bytes` is the size of one packed 32x32 tile; `fraction_bits` the
    mantissa bits a value can carry after unpacking to bf16-style data (what the fidelity phases
    see); `tt_metal` whether tt-metal has the format (fp32 is the emulator's no-rounding format)."""

    name: str
    bytes_per_element: float
    tile_bytes: int
    fraction_bits: int
    mag_bits: int | None = None
    tt_metal: bool = True

    @property
    def is_block(self) -> bool:
        return self.mag_bits is not None

    @property
    def max_mag(self) -> int:
        return (1 << self.mag_bits) - 1

    @property
    def frac_shift(self) -> int:
        """log2 of the magnitude unit: value = mag * 2^(E-127-frac_shift) (6 for bfp8, 2 for bfp4)."""
        return self.mag_bits - 1


FORMATS: dict[str, Format] = {
    "fp32": Format("fp32", 4.0, 4096, 23, tt_metal=False),
    "bf16": Format("bf16", 2.0, 2048, 7),
    "bfp8": Format("bfp8", 1.0625, 1088, 6, mag_bits=7),  # 1 leading + 6 fraction bits
    "bfp4": Format("bfp4", 0.5625, 576, 2, mag_bits=3),
}


def get_format(fmt: str | Format) -> Format:
    """The `Format` for a name (or the record itself); ValueError naming the legal names."""
    if isinstance(fmt, Format):
        return fmt
    name = getattr(fmt, "value", fmt)  # also accept enums whose value is the name
    if isinstance(name, str) and name in FORMATS:
        return FORMATS[name]
    raise ValueError(f"unknown format {fmt!r}; legal formats: {', '.join(FORMATS)}")


def bytes_per_element(fmt: str | Format) -> float:
    """Storage cost per element (bfp8 1.0625, bfp4 0.5625, bf16 2, fp32 4), for the perf model."""
    return get_format(fmt).bytes_per_element
