"""The objectives a study can optimise or constrain: one table, `OBJECTIVES`, and the lookups
derived from it (Optuna direction, legal names, axis labels, units, error-bar kinds, CSV columns).

An objective is named `KIND` (`top1`, `kld`) or `KIND:DEVICE` (`speed:N150`): per-device kinds
need a device of the study; the accuracy kinds may take one (the accuracy as emulated for that
device's numerics, `TrialRecord.on`). Adding an objective is one entry here (plus the record
field it reads, `sweep.records.TrialRecord`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str  # the kind: `top1`, `speed`
    direction: str  # Optuna's word: "maximize" / "minimize"
    per_device: bool  # a figure per device (`speed:N150`): TrialRecord.<name> is a {device: value} table
    device_accuracy: bool = False  # emulated per device's numerics (TrialRecord.on): `top1:N300` is legal
    label: str | None = None  # axis label of the plots; None: the objective string itself
    short: str | None = None  # its name in prose ("Top-1", "TTFT")
    unit: str = ""
    interval: str | None = None  # error bars: "wilson" (TrialRecord.<name>_ci, 95%), "perf" (engine.perf.model, 90%)
    decimals: int = 1  # digits of its figures in text
    default: bool = False  # a study's objective when its file names none (per device: its primary device)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("top1", "maximize", False, True, "Top-1 (%)", "Top-1", "%", "wilson", default=True),
    Objective("top5", "maximize", False, True, "Top-5 (%)", "Top-5", "%", "wilson", default=True),
    Objective("speed", "maximize", True, label="Speed (t/s/u)", short="speed", unit="t/s/u", interval="perf",
              default=True),
    Objective("ttft", "minimize", True, label="TTFT (ms)", short="TTFT", unit="ms", interval="perf", decimals=0,
              default=True),
    Objective("kld", "minimize", False, True, unit="nats"),
    Objective("ppl", "minimize", False),
)}
#: Direction of each objective kind (Optuna's words).
DIRECTIONS = {name: o.direction for name, o in OBJECTIVES.items()}
SCALAR = tuple(n for n, o in OBJECTIVES.items() if not o.per_device)  # top1, top5, kld, ppl
PER_DEVICE = tuple(n for n, o in OBJECTIVES.items() if o.per_device)  # speed, ttft


def kind_of(objective: str) -> Objective | None:
    """The table entry of `objective` (`speed:N150` -> speed), or None for an unknown kind."""
    return OBJECTIVES.get(objective.partition(":")[0])


def direction(objective: str) -> str:
    return DIRECTIONS[objective.partition(":")[0]]


def legal_names(devices=("DEVICE",), *, scalar_first: bool = True) -> str:
    """The legal objective names, for messages: `top1, top5, kld, ppl, speed:D, ttft:D` per device
    (`scalar_first=False`: in table order, `top1, top5, speed:D, ttft:D, kld, ppl`)."""
    if not scalar_first:
        return ", ".join(n + (f":{devices[0]}" if OBJECTIVES[n].per_device else "") for n in OBJECTIVES)
    return ", ".join([*SCALAR, *(f"{k}:{d}" for d in devices for k in PER_DEVICE)])


def perf_metric(objective: str) -> tuple[str, str] | None:
    """(kind, device) of a performance-model objective (`speed:N150`), else None."""
    kind, _, device = objective.partition(":")
    o = OBJECTIVES.get(kind)
    return (kind, device) if o is not None and o.interval == "perf" and device else None


def wilson(objective: str) -> bool:
    """Whether `objective` has a 95% Wilson interval on the record (TrialRecord.<name>_ci)."""
    o = OBJECTIVES.get(objective)
    return o is not None and o.interval == "wilson"


def label(objective: str) -> str:
    """The axis label of `objective` (`Top-1 (%)`), or the objective string when it has none."""
    o = kind_of(objective)
    return o.label if o is not None and o.label else objective


def default_objectives(primary: str) -> list[str]:
    """A study's objectives when its file names none: `top1, top5, speed:PRIMARY, ttft:PRIMARY`."""
    return [n + (f":{primary}" if o.per_device else "") for n, o in OBJECTIVES.items() if o.default]


def scalar_columns(record) -> dict[str, float]:
    """The objective columns of a trial's row in the points CSV (sweep.pareto), split around the
    row's other columns: the scalar ones (with `_lo` / `_hi` for Wilson intervals) first."""
    row: dict[str, float] = {}
    for n in SCALAR:
        row[n] = getattr(record, n)
        if OBJECTIVES[n].interval == "wilson":
            row[f"{n}_lo"], row[f"{n}_hi"] = getattr(record, f"{n}_ci")
    return row


def device_columns(record, devices, missing: float) -> dict[str, float]:
    """The per-device objective columns of a trial's row in the points CSV: `speed:D`, `ttft:D`."""
    return {f"{k}:{d}": getattr(record, k).get(d, missing) for d in devices for k in PER_DEVICE}
