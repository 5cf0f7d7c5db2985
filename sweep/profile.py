"""A sensitivity profile: every probe's damage against the base config, read from the trials of a
sensitivity study (`StudySpec.sensitivity_study`, sweep.probes).

Damage is paired on the same tokens (engine.accuracy.stats.compare, probe minus base): delta-KLD with its
moving-block bootstrap 95% interval, delta-Top-1, and the Top-1 discordant positions (probe right
base wrong, base right probe wrong) with the exact McNemar p.

The allocator sums column `damage`: the upper end of each probe's delta-KLD 95% interval.
Pessimistic on purpose. Hundreds of probes put about half of the harmless-looking ones below zero
by noise, and an optimiser over the estimates picks exactly those (the winner's curse): it makes
many "free" changes whose small true damage adds up. bench/bench_allocate.py measures both rules
at each budget (reports/allocate/README.md, "Damage rule").
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from sweep.probes import Probe, ProbeSpace

COLUMNS = ("layer", "family", "choice", "probe", "trial", "config_kld", "config_top1", "d_kld", "d_kld_lo", "d_kld_hi",
           "damage", "d_top1", "probe_right", "base_right", "p_value")
#: The profile's bootstrap: fewer resamples than `sweep compare` (hundreds of probes), same blocks.
N_RESAMPLES = 400


class ProfileIncomplete(ValueError):
    """Some probes have no completed trial yet."""


def trials_by_config(study) -> dict[str, object]:
    """Canonical config string -> its COMPLETE trial, following `skipped_configs` (a grid config
    skipped as equal in numerics to another reads that one's trial)."""
    from optuna.trial import TrialState

    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        out.setdefault(t.user_attrs.get("config"), t)
    for s in study.user_attrs.get("skipped_configs") or []:
        if s["same_as"] in out:
            out.setdefault(s["config"], out[s["same_as"]])
    return out


def measured(study, space: ProbeSpace, *, allow_missing: bool = False) -> pd.DataFrame:
    """One row per probe (COLUMNS), in probe order; the base row has layer -1 and zero deltas.
    ProfileIncomplete when a probe has no trial (unless `allow_missing`: those rows are left out)."""
    from engine.accuracy.stats import compare
    from sweep.records import token_record_of

    by_config = trials_by_config(study)
    base_t = by_config.get(str(space.base))
    if base_t is None:
        raise ProfileIncomplete(f"study {study.study_name!r} has no completed base trial; run `sweep sensitivity` on it")
    base_rec = token_record_of(base_t.user_attrs)
    rows, missing = [], []
    for p in space.probes:
        t = by_config.get(str(space.probe_config(p)))
        if t is None:
            missing.append(p.label)
            continue
        a = t.user_attrs
        if p.layer is None:
            rows.append(_row(p, t.number, a, (0.0, 0.0, 0.0), 0.0, (0, 0), 1.0))
            continue
        c = compare(token_record_of(a), base_rec, n_resamples=N_RESAMPLES)
        rows.append(_row(p, t.number, a, c.delta_kld, c.delta_top1[0], c.discordant, c.p_value))
    if missing and not allow_missing:
        raise ProfileIncomplete(f"{len(missing)} of {space.size} probes of study {study.study_name!r} are not measured yet "
                                f"(first: {missing[0]}); run `sweep sensitivity STUDY` to finish the profile")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _row(p: Probe, number: int, attrs: dict, d_kld, d_top1: float, disc, p_value: float) -> dict:
    return {"layer": -1 if p.layer is None else p.layer, "family": p.family or "base", "choice": p.choice or "base",
            "probe": p.label, "trial": number, "config_kld": float(attrs["kld"]), "config_top1": float(attrs["top1"]),
            "d_kld": float(d_kld[0]), "d_kld_lo": float(d_kld[1]), "d_kld_hi": float(d_kld[2]),
            "damage": float(d_kld[2]), "d_top1": float(d_top1),  # the upper end: see the module docstring
            "probe_right": int(disc[0]), "base_right": int(disc[1]), "p_value": float(p_value)}


def damage_table(profile: pd.DataFrame, column: str = "damage") -> dict[tuple[int, str, str], float]:
    """(layer, family, choice) -> damage, for the allocator (the base row left out)."""
    probes = profile[profile["layer"] >= 0]
    return {(int(r.layer), str(r.family), str(r.choice)): float(getattr(r, column)) for r in probes.itertuples()}


def write_csv(profile: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.to_csv(path, index=False, float_format="%.6g")
    return path


def read_csv(path: str | Path) -> pd.DataFrame:
    """A profile CSV written by `write_csv` (checked for its columns)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} not found; run `sweep sensitivity STUDY --out {path.parent}` first")
    df = pd.read_csv(path)
    lacking = [c for c in ("layer", "family", "choice", "d_kld") if c not in df.columns]
    if lacking:
        raise ValueError(f"{path} is not a sensitivity profile (no column {lacking[0]!r}); rewrite it with `sweep sensitivity`")
    return df
