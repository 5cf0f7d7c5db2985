"""Systems for the performance model and every other consumer (data in data/devices.json).

`DEVICES` (name -> `Device`) is the one table: the performance model, `sweep/space.py`'s legal
devices and the accuracy code's tensor-parallel rounding all derive from it; adding a system is
one JSON entry. A system of `chips` chips runs `dp` data-parallel replicas; each replica is
tensor parallel over `chips // dp` chips, laid out as tt_transformers lays it out:

* `single`  one chip, no collectives.
* `line`    1-D tensor parallel over a line of chips (`Topology.Linear`: N300, 4-chip meshes).
* `ring`    the same over 8 chips closed into a ring (`Topology.Ring`: T3K).
* `mesh2d`  the 32-chip Galaxy (TG) as an 8 x 4 mesh: every matmul is 2-D sharded, K over one
            mesh axis and N over the other, with collectives along mesh rows and columns.

A data-parallel sub-mesh of `tp` chips is run like the system of that size in the table
(tt_transformers names a mesh by its chip count: `determine_device_name`), so its links and
topology come from that row (a TG pair is an N300; 8 TG chips are a T3K ring).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping

DATA = Path(__file__).resolve().parents[1] / "data" / "devices.json"


@dataclass(frozen=True)
class Chip:
    name: str
    arch: str
    cores: int
    cores_on_die: int
    dram_banks: int
    dram_gb: float
    dram_bw_gbs: float
    clock_ghz: float
    cycles_per_tile_phase: int
    eth_links: int
    eth_payload_gbs: float
    hop_us: float
    grid: tuple[int, int] = (8, 8)  # compute grid (rows, cols) the matmul program configs divide work over
    prefill_block_rows: int = 1024  # tt_transformers' prefill_len_cutoff: weights re-read per block of rows
    numerics: str = ""  # "" = the engine emulates this chip's numerics; else why it does not
    source: str = ""

    @property
    def numerics_modelled(self) -> bool:
        return not self.numerics


@dataclass(frozen=True)
class Device:
    name: str
    chips: int
    mesh: tuple[int, int]  # (axis 0, axis 1) chip counts
    topology: str  # single | line | ring | mesh2d
    ccl_links: tuple[int, int]  # links per neighbour a collective uses along axis 0 / axis 1
    chip: Chip
    calibrated: bool = False  # the performance model's parameters are fitted on this system's rows
    notes: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def tp(self) -> int:
        """Tensor-parallel width of one replica at dp=1 (every chip of the system)."""
        return self.chips

    @property
    def arch(self) -> str:
        return self.chip.arch

    @property
    def dram_bw_gbs(self) -> float:
        return self.chips * self.chip.dram_bw_gbs

    def legal_dp(self) -> list[int]:
        return [d for d in range(1, self.chips + 1) if self.chips % d == 0]

    def replica(self, dp: int = 1) -> "Replica":
        """The layout of one of `dp` data-parallel replicas."""
        if dp < 1 or self.chips % dp:
            raise ValueError(f"dp={dp} does not divide the {self.chips} chips of {self.name}; legal dp: {self.legal_dp()}")
        tp = self.chips // dp
        if tp == self.chips:
            if self.topology in ("single", "mesh2d"):
                return Replica(self, dp, tp, self.topology, self.mesh, self.ccl_links, self.name)
            return Replica(self, dp, tp, self.topology, (1, tp), (self.ccl_links[1],) * 2, self.name)
        same = [d for d in DEVICES.values() if d.chips == tp and d.chip == self.chip and d.topology != "mesh2d"]
        if same:  # a sub-mesh runs as the system of its size (links and topology from the table)
            return replace(same[0].replica(1), device=self, dp=dp)
        # tt_transformers' fallback for a size it has no row for: 1 link, Topology.Linear
        return Replica(self, dp, tp, "single" if tp == 1 else "line", (1, tp), (1, 1) if tp > 1 else (0, 0), self.name)


@dataclass(frozen=True)
class Replica:
    device: Device
    dp: int
    tp: int  # chips per replica
    layout: str  # single | line | ring | mesh2d
    mesh: tuple[int, int]
    links: tuple[int, int]
    system: str = ""  # the table row this replica runs as (a TG pair runs as an N300)

    @property
    def chip(self) -> Chip:
        return self.device.chip

    @property
    def mesh_kn(self) -> tuple[int, int]:
        """(K split, N split) of a column-parallel matmul (qkv, w1, w3): 2-D only on the Galaxy mesh."""
        if self.layout == "mesh2d":
            return self.mesh[1], self.mesh[0]  # K over the 4-chip axis, N over the 8-chip axis
        return 1, self.tp

    def k_split(self, op: str) -> int:
        """How many chips hold partial sums of one output of `op` (qkv, wo, ff1_3, ff2, lm_head):
        the ways a tensor-parallel matmul's reduction dimension is split, hence how many partials
        are rounded and added by a collective."""
        if self.layout == "single":
            return 1
        if self.layout == "mesh2d":
            return self.mesh[0] if op in ("wo", "ff2") else self.mesh[1]
        return self.tp if op in ("wo", "ff2") else 1


def _load_table() -> dict[str, Device]:
    data = json.loads(DATA.read_text())
    chips = {name: Chip(name=name, **{**spec, "grid": tuple(spec["grid"])}) for name, spec in data["chips"].items()}
    out: dict[str, Device] = {}
    for name, s in data["systems"].items():
        chip = chips.get(s["chip"])
        if chip is None:
            raise ValueError(f"{DATA.name}: system {name} names unknown chip {s['chip']!r}; known: {', '.join(chips)}")
        out[name] = Device(name=name, chips=int(s["chips"]), mesh=tuple(s["mesh"]), topology=s["topology"],
                           ccl_links=tuple(s["ccl_links"]), chip=chip, calibrated=bool(s.get("calibrated", False)),
                           notes=s.get("notes", ""), aliases=tuple(s.get("aliases", ())))
        if out[name].mesh[0] * out[name].mesh[1] != out[name].chips:
            raise ValueError(f"{DATA.name}: system {name}: mesh {s['mesh']} does not hold {s['chips']} chips")
    return out


DEVICES: Mapping[str, Device] = _load_table()


def emulated_devices() -> tuple[str, ...]:
    """Systems whose numerics the engine emulates (a modelled chip, not the 2-D Galaxy mesh)."""
    return tuple(n for n, d in DEVICES.items() if d.chip.numerics_modelled and d.topology != "mesh2d")


def numerics_chip() -> Chip:
    """The chip whose numerics the engine emulates (its grid sets the program configs' K blocks)."""
    chips = {d.chip.name: d.chip for d in DEVICES.values() if d.chip.numerics_modelled}
    if len(chips) != 1:
        raise ValueError(f"{DATA.name}: exactly one chip may have modelled numerics, found {sorted(chips)}")
    return next(iter(chips.values()))


def device_names() -> tuple[str, ...]:
    """Every system of the table, in table order."""
    return tuple(DEVICES)


@lru_cache(maxsize=1)
def _index() -> dict[str, str]:
    idx = {}
    for d in DEVICES.values():
        for key in (d.name, *d.aliases):
            idx[key.lower().replace(" ", "")] = d.name
    return idx


def normalise_device(name: str) -> str:
    """Canonical device name; `150` (a typo in the seed's batch-32 table) reads as N150."""
    key = str(name).strip().lower().replace(" ", "")
    idx = _index()
    if key in idx:
        return idx[key]
    if key.isdigit() and f"n{key}" in idx:
        return idx[f"n{key}"]
    raise ValueError(f"unknown device {name!r}; legal devices: {', '.join(DEVICES)}")


def device_for(name: str | Device) -> Device:
    if isinstance(name, Device):
        return name
    return DEVICES[normalise_device(name)]
