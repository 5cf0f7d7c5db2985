"""Optuna metric names for a study's objectives, so optuna-dashboard (and `study.metric_names`)
label the axes `top1`, `top5`, `speed:N150`, `ttft:N150` instead of "Objective 0, 1, ...".

The names are the study's objective strings (sweep.records), which also say the device."""
from __future__ import annotations

import warnings
from typing import Sequence


def set_metric_names(study, objectives: Sequence[str]) -> None:
    """Name the study's values after `objectives` (written once; a no-op when already set)."""
    import optuna

    names = [str(o) for o in objectives]
    if len(names) != len(study.directions):
        raise ValueError(f"{len(names)} objective names for {len(study.directions)} study directions")
    if study.metric_names == names:
        return
    with warnings.catch_warnings():  # set_metric_names is marked experimental in Optuna 4/5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)
