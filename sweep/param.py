"""`Param`: one categorical Optuna parameter of a search space (sweep.space, sweep.probes)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One categorical Optuna parameter: a group's value on some decoder layers (or, for a
    sensitivity study, which probe a trial runs)."""

    name: str  # "ff1_3", "L0.ff1_3" or "probe"
    field: str  # the config key it sets ("probe": none)
    choices: tuple[str, ...]
    layers: tuple[int, ...]  # decoder layers it sets
