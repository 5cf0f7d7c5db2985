"""Wormhole systems for the performance model: N150, N300, T3K, TG (data in data/devices.json).

A system of `chips` Wormhole chips runs `dp` data-parallel replicas; each replica is tensor
parallel over `chips // dp` chips. How a replica is laid out decides the collectives:

* `single`  one chip, no collectives.
* `line`    1-D tensor parallel over a line of chips (N300, sub-meshes of T3K/TG): column-parallel
            qkv / w1 / w3, row-parallel wo / w2, an all-reduce (reduce-scatter + all-gather) after
            wo and after w2, as tt_transformers does on N300 (`Topology.Linear`).
* `ring`    the same over the 8 chips of a T3K closed into a ring (`Topology.Ring`): each
            collective moves half the data per direction.
* `mesh2d`  the 32-chip Galaxy (TG) as an 8 x 4 mesh: every matmul is 2-D sharded, the reduction
            dimension K over one mesh axis and the output dimension N over the other, as
            tt_transformers' TG path does (w1/w3: K over the 4-chip axis, N over the 8-chip axis;
            w2: K over 8, N over 4; attention heads over the 8-chip axis). After each matmul the
            partial sums are all-reduced along its K axis.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "devices.json"


@dataclass(frozen=True)
class Chip:
    cores: int
    cores_on_die: int
    dram_banks: int
    dram_gb: float
    dram_bw_gbs: float
    clock_ghz: float
    cycles_per_tile_phase: int
    eth_links: int
    eth_raw_gbs: float
    eth_payload_gbs: float
    hop_us: float


@dataclass(frozen=True)
class Device:
    name: str
    chips: int
    mesh: tuple[int, int]  # (axis 0, axis 1) chip counts
    topology: str  # single | line | ring | mesh2d
    ccl_links: tuple[int, int]  # links per neighbour used by a collective along axis 0 / axis 1
    chip: Chip
    notes: str = ""

    @property
    def dram_bw_gbs(self) -> float:
        return self.chips * self.chip.dram_bw_gbs

    def replica(self, dp: int = 1) -> "Replica":
        """The layout of one of `dp` data-parallel replicas."""
        if dp < 1 or self.chips % dp:
            legal = [d for d in range(1, self.chips + 1) if self.chips % d == 0]
            raise ValueError(f"dp={dp} does not divide the {self.chips} chips of {self.name}; legal dp: {legal}")
        tp = self.chips // dp
        if tp == 1:
            return Replica(self, dp, 1, "single", (1, 1), (0, 0))
        if tp == self.chips and self.topology == "mesh2d":
            return Replica(self, dp, tp, "mesh2d", self.mesh, self.ccl_links)
        if tp == self.chips and self.topology == "ring":
            return Replica(self, dp, tp, "ring", (1, tp), (self.ccl_links[0], self.ccl_links[0]))
        # a line of tp chips (N300, or a sub-mesh of T3K / TG along its long axis)
        return Replica(self, dp, tp, "line", (1, tp), (self.ccl_links[0], self.ccl_links[0]))


@dataclass(frozen=True)
class Replica:
    device: Device
    dp: int
    tp: int  # chips per replica
    layout: str  # single | line | ring | mesh2d
    mesh: tuple[int, int]
    links: tuple[int, int]

    @property
    def chip(self) -> Chip:
        return self.device.chip

    @property
    def mesh_kn(self) -> tuple[int, int]:
        """(K split, N split) of a column-parallel matmul: 2-D only on the Galaxy mesh."""
        if self.layout == "mesh2d":
            return self.mesh[1], self.mesh[0]  # K over the 4-chip axis, N over the 8-chip axis
        return 1, self.tp


@lru_cache(maxsize=1)
def _load() -> dict[str, Device]:
    data = json.loads(DATA.read_text())
    chip = Chip(**data["chip"])
    out = {}
    for name, s in data["systems"].items():
        out[name] = Device(name=name, chips=s["chips"], mesh=tuple(s["mesh"]), topology=s["topology"],
                           ccl_links=tuple(s["ccl_links"]), chip=chip, notes=s.get("notes", ""))
    return out


def system_names() -> list[str]:
    """Every system in the device table (N150, N300, T3K, TG), smallest first."""
    return list(_load())


def normalise_device(name: str) -> str:
    """Canonical device name; `150` (a typo in the seed's batch-32 table) reads as N150."""
    text = str(name).strip()
    table = {n.lower(): n for n in _load()}
    key = text.lower().replace(" ", "")
    if key in table:
        return table[key]
    if key.isdigit() and f"n{key}" in table:
        return table[f"n{key}"]
    if key in ("galaxy", "wh-galaxy"):
        return "TG"
    if key in ("t3000", "t3k", "quietbox", "loudbox"):
        return "T3K"
    raise ValueError(f"unknown device {name!r}; legal devices: {', '.join(_load())}")


def device_for(name: str | Device) -> Device:
    if isinstance(name, Device):
        return name
    return _load()[normalise_device(name)]
