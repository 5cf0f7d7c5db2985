"""Pareto fronts, hypervolume, knee point and noise awareness over a study's COMPLETE trials.

Everything numeric is numpy (non-domination and hypervolume: moocore) over a value matrix (one row per point, one column per
objective) plus a direction per column (`"maximize"` / `"minimize"`, as in Optuna and
`sweep.objectives.DIRECTIONS`). Objectives are named as in `sweep.objectives`: `top1`, `top5`,
`speed:<DEVICE>`, `ttft:<DEVICE>`.

Definitions (stated here once, used by the report, the plots and the notebook):

* Dominance: a dominates b when a is at least as good on every objective and strictly better on
  one. The front is the set of non-dominated points; identical value vectors are all kept (as
  Optuna's `study.best_trials` does), so ties and duplicates are all on the front.
* Non-dominated sorting: rank 0 is the front, rank 1 the front of the rest, and so on.
* Hypervolume: the volume dominated by the front and bounded by a reference point, computed in
  the original units. The default reference point (`default_reference`) is the worst observed
  value of each objective moved a further 10% of that objective's observed range (at least 1%
  of its magnitude, at least 1e-9) in the worse direction, so every point, extremes included,
  adds volume. Reports print the reference point next to the number.
* Knee: the front point closest (Euclidean) to the ideal point after scaling each objective to
  [0, 1] over the front (1 = best); a single-point front is its own knee.
* Within noise (`NOISE_PAIRED`): a point off the front is within noise unless a front point
  dominates it at 95%. The front points compared with it are those at equal or better value on
  every other objective considered (for the 2-D Top-1 / speed front: at equal or better speed);
  each is tested against it with the exact McNemar test on the per-token Top-1 hits
  (`engine.accuracy.stats`: same tokens, so only the discordant ones count), a front point counting only
  when it wins more discordant tokens, and the p-values are Holm-corrected over those front
  points. A point no front point beats significantly cannot be told apart from the front.
  Studies whose trials lack per-token records fall back to the unpaired rule (`NOISE_WILSON`):
  the point's Top-1 95% Wilson interval overlaps such a front point's. `DeviceFront.noise_rule`
  says which rule was used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import moocore
import numpy as np

from sweep.objectives import device_columns, direction, scalar_columns
from sweep.records import TrialRecord

NOISE_PAIRED = ("no front point at equal or better speed has a significantly higher Top-1: exact McNemar test on "
                "the per-token Top-1 hits, Holm-corrected over those front points, 95%")
NOISE_WILSON = ("Top-1 95% Wilson interval overlaps that of a front point at equal or better speed (unpaired: "
                "the trials have no per-token records)")

MAXIMIZE, MINIMIZE = "maximize", "minimize"


# --- numeric core ----------------------------------------------------------------------------
def _signs(directions: Sequence[str]) -> np.ndarray:
    out = []
    for d in directions:
        d = getattr(d, "name", d)  # accept optuna.study.StudyDirection
        d = str(d).lower()
        if d not in (MAXIMIZE, MINIMIZE):
            raise ValueError(f"unknown direction {d!r}; legal: maximize, minimize")
        out.append(1.0 if d == MAXIMIZE else -1.0)
    return np.asarray(out, dtype=float)


def _as_max(values: np.ndarray | Sequence, directions: Sequence[str]) -> np.ndarray:
    """Values turned so that larger is better in every column."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return np.zeros((0, len(directions)))
    if v.ndim == 1:
        v = v.reshape(-1, 1) if len(directions) == 1 else v.reshape(1, -1)
    if v.ndim != 2:
        raise ValueError(f"values must be a (points, objectives) matrix, got shape {v.shape}")
    if v.shape[1] != len(directions):
        raise ValueError(f"{v.shape[1]} objective columns but {len(directions)} directions")
    if v.size and not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or inf; drop those points first")
    return v * _signs(directions)


def pareto_mask(values: np.ndarray | Sequence, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated points (ties and duplicates all kept), by moocore."""
    v = _as_max(values, directions)
    if v.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(v, maximise=True, keep_weakly=True), dtype=bool)


def front_indices(values: np.ndarray | Sequence, directions: Sequence[str]) -> np.ndarray:
    """Indices of the non-dominated points, in input order."""
    return np.flatnonzero(pareto_mask(values, directions))


def nondominated_ranks(values: np.ndarray | Sequence, directions: Sequence[str]) -> np.ndarray:
    """Front number of every point: 0 = the Pareto front, 1 = the front once rank 0 is removed, ...
    (moocore's non-dominated sorting; duplicates share a rank)."""
    v = _as_max(values, directions)
    if v.shape[0] == 0:
        return np.zeros(0, dtype=int)
    return np.asarray(moocore.pareto_rank(v, maximise=True), dtype=int)


def default_reference(values: np.ndarray | Sequence, directions: Sequence[str], margin: float = 0.1) -> np.ndarray:
    """Worst observed value per objective, pushed `margin` of the observed range further out."""
    v = np.asarray(values, dtype=float)
    s = _signs(directions)
    vm = _as_max(v, directions)
    if vm.shape[0] == 0:
        raise ValueError("no points: cannot choose a reference point")
    worst, best = vm.min(axis=0), vm.max(axis=0)
    pad = np.maximum(margin * (best - worst), np.maximum(0.01 * np.abs(worst), 1e-9))
    return (worst - pad) * s


def hypervolume(values: np.ndarray | Sequence, directions: Sequence[str], reference: Sequence[float] | None = None) -> float:
    """Hypervolume dominated by the points w.r.t. `reference` (default: `default_reference`), by
    moocore. Points that do not beat the reference on every objective add nothing."""
    vm = _as_max(values, directions)
    if vm.shape[0] == 0:
        return 0.0
    ref = default_reference(values, directions) if reference is None else np.asarray(reference, dtype=float)
    if ref.shape != (vm.shape[1],):
        raise ValueError(f"reference point has {ref.size} values for {vm.shape[1]} objectives")
    refm = ref * _signs(directions)
    p = vm[(vm > refm).all(axis=1)]
    if p.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(p, ref=refm, maximise=True))


def knee_index(values: np.ndarray | Sequence, directions: Sequence[str], mask: np.ndarray | None = None) -> int | None:
    """Index of the knee point (see module doc) among the front (or among `mask` if given)."""
    vm = _as_max(values, directions)
    if vm.shape[0] == 0:
        return None
    m = pareto_mask(vm, [MAXIMIZE] * vm.shape[1]) if mask is None else np.asarray(mask, dtype=bool)
    idx = np.flatnonzero(m)
    if idx.size == 0:
        return None
    f = vm[idx]
    lo, hi = f.min(axis=0), f.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = np.where(hi > lo, (f - lo) / span, 1.0)
    dist = np.sqrt(((1.0 - norm) ** 2).sum(axis=1))
    return int(idx[int(np.argmin(dist))])  # ties: the earliest point


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(a[0] <= b[1] and b[0] <= a[1])


def within_noise_mask(
    ci: np.ndarray | Sequence,
    others: np.ndarray | Sequence,
    other_directions: Sequence[str],
    front: np.ndarray,
) -> np.ndarray:
    """Points off `front` whose interval (ci[i] = (lo, hi)) overlaps that of a front point at equal
    or better value on every column of `others` (e.g. speed on one device): a front point that
    beats them only by a Top-1 margin inside the noise, so their true Top-1 may put them on the front."""
    ci = np.asarray(ci, dtype=float).reshape(-1, 2)
    front = np.asarray(front, dtype=bool)
    n = ci.shape[0]
    o = _as_max(others, other_directions) if len(other_directions) else np.zeros((n, 0))
    out = np.zeros(n, dtype=bool)
    f_idx = np.flatnonzero(front)
    for i in np.flatnonzero(~front):
        if not f_idx.size:
            break
        ok = (o[f_idx] >= o[i][None, :]).all(axis=1)
        ok &= (ci[i, 0] <= ci[f_idx, 1]) & (ci[f_idx, 0] <= ci[i, 1])
        out[i] = bool(ok.any())
    return out


def within_noise_paired(
    records: Sequence,
    others: np.ndarray | Sequence,
    other_directions: Sequence[str],
    front: np.ndarray,
    alpha: float = 0.05,
) -> np.ndarray:
    """Points off `front` that no front point at equal or better value on every column of
    `others` beats on Top-1 at level `alpha` (exact McNemar on the per-token records,
    `engine.accuracy.stats.TokenRecord`, Holm-corrected over the front points compared)."""
    from engine.accuracy.stats import holm, significantly_better

    front = np.asarray(front, dtype=bool)
    n = front.size
    o = _as_max(others, other_directions) if len(other_directions) else np.zeros((n, 0))
    out = np.zeros(n, dtype=bool)
    f_idx = np.flatnonzero(front)
    for i in np.flatnonzero(~front):
        cand = f_idx[(o[f_idx] >= o[i][None, :]).all(axis=1)]
        if not cand.size:
            continue
        reject, _ = holm([significantly_better(records[j], records[i]) for j in cand], alpha)
        out[i] = not bool(reject.any())
    return out


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion, in percent."""
    if n <= 0:
        return (0.0, 100.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


# --- studies -> points -------------------------------------------------------------------------
@dataclass
class Point:
    """One COMPLETE trial: its number (the label in plots, CSV and front files) and its record."""

    number: int
    record: TrialRecord
    params: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True  # every Optuna constraint value <= 0 (infeasible points are never on a front)

    @property
    def config(self) -> str:
        return self.record.config

    def tokens(self):
        """The trial's per-token record (decoded once), or None."""
        if not hasattr(self, "_tokens"):
            self._tokens = self.record.tokens_record()
        return self._tokens

    def value(self, objective: str) -> float:
        return self.record.objective(objective)


@dataclass
class StudyInfo:
    name: str
    model: str
    devices: list[str]
    objectives: list[str]
    spec: dict
    perf_calibration: str
    skipped: list = field(default_factory=list)  # grid configs not run: [{"config", "same_as"}] (sweep.study)


def study_info(study, points: Sequence[Point] | None = None) -> StudyInfo:
    """Study-level facts from the study's user attributes, falling back to what the trials hold."""
    attrs = dict(study.user_attrs)
    pts = list(points) if points is not None else complete_points(study)
    model = attrs.get("model") or (pts[0].record.model if pts else "")
    devices = list(attrs.get("devices") or [])
    if not devices:
        for p in pts:
            for d in p.record.speed:
                if d not in devices:
                    devices.append(d)
    objectives = list(attrs.get("objectives") or [])
    if not objectives:
        objectives = ["top1"] + [f"speed:{devices[0]}"] if devices else ["top1"]
        objectives = objectives[: len(study.directions)]
    spec = attrs.get("spec") or {}
    return StudyInfo(study.study_name, model, devices, objectives, spec if isinstance(spec, dict) else {},
                     str(attrs.get("perf_calibration") or ""), list(attrs.get("skipped_configs") or []))


def complete_points(study) -> list[Point]:
    """Every COMPLETE trial that carries a TrialRecord, in trial-number order, with its feasibility
    under the study's constraints (as Optuna judges it: every constraint value <= 0)."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "config" not in t.user_attrs or "top1" not in t.user_attrs:
            continue
        feasible = all(v <= 0.0 for v in (getattr(t, "constraints", None) or {}).values())
        out.append(Point(t.number, TrialRecord.from_user_attrs(t.user_attrs), dict(t.params), feasible))
    out.sort(key=lambda p: p.number)
    return out


def values_of(points: Sequence[Point], objectives: Sequence[str]) -> np.ndarray:
    return np.array([[p.value(o) for o in objectives] for p in points], dtype=float).reshape(len(points), len(objectives))


def directions_of(objectives: Sequence[str]) -> list[str]:
    return [direction(o) for o in objectives]


def front_of(points: Sequence[Point], objectives: Sequence[str]) -> list[Point]:
    """The non-dominated feasible points over `objectives` (any subset of the study's), in input order."""
    points = [p for p in points if p.feasible]
    if not points:
        return []
    m = pareto_mask(values_of(points, objectives), directions_of(objectives))
    return [p for p, keep in zip(points, m) if keep]


def front_2d(points: Sequence[Point], x: str, y: str) -> list[Point]:
    """Front of the (x, y) projection, sorted along x (the order to draw the front line)."""
    f = front_of(points, [x, y])
    return sorted(f, key=lambda p: (p.value(x), p.value(y)))


@dataclass
class DeviceFront:
    device: str
    objectives: list[str]  # ["top1", "speed:<device>"]
    front: list[int]  # trial numbers, fastest first
    within_noise: list[int]
    knee: int | None
    hypervolume: float
    reference: list[float]
    noise_rule: str = NOISE_PAIRED  # the test behind within_noise (NOISE_PAIRED or NOISE_WILSON)


@dataclass
class Analysis:
    """A study's points with their fronts: the one input of the report, the plots and the notebook."""

    info: StudyInfo
    points: list[Point]
    front: list[int]  # trial numbers on the front of all study objectives (= Optuna's best_trials)
    ranks: dict[int, int]
    knee: int | None
    hypervolume: float
    reference: list[float]  # hypervolume reference point, one value per study objective
    devices: dict[str, DeviceFront]

    def point(self, number: int) -> Point:
        for p in self.points:
            if p.number == number:
                return p
        raise KeyError(f"no COMPLETE trial number {number}")

    def front_numbers(self) -> list[int]:
        """Union of the study front and every device's Top-1 / speed front, in trial order."""
        s = set(self.front)
        for d in self.devices.values():
            s.update(d.front)
        return sorted(s)

    def reference_text(self) -> str:
        return ", ".join(f"{o} = {r:.4g}" for o, r in zip(self.info.objectives, self.reference))

    def frame(self):
        """pandas DataFrame, one row per COMPLETE trial (the CSV's content)."""
        import pandas as pd

        rows = []
        for p in self.points:
            r = p.record
            row: dict[str, Any] = {
                "trial": p.number, "model": r.model, "config": r.config, **scalar_columns(r), "ref_ppl": r.ref_ppl, "tokens": r.tokens, "windows": r.windows,
                "kld_se": r.kld_stats.get("kld_se", math.nan), "kld_p99": r.kld_stats.get("kld_p99", math.nan),
                "rms_dp": r.kld_stats.get("rms_dp", math.nan),
            }
            row.update(device_columns(r, self.info.devices, math.nan))
            row["feasible"] = p.feasible
            row["front"] = p.number in self.front
            row["rank"] = self.ranks.get(p.number, -1)
            row["knee"] = p.number == self.knee
            for d, df in self.devices.items():
                row[f"front:{d}"] = p.number in df.front
                row[f"within_noise:{d}"] = p.number in df.within_noise
                row[f"knee:{d}"] = p.number == df.knee
            row["within_noise"] = any(p.number in df.within_noise for df in self.devices.values())
            row["reused_from"] = r.reused_from or ""
            rows.append(row)  # no wall time: the committed CSV must read the same bytes on every re-run
        return pd.DataFrame(rows)


def _usable(points: Sequence[Point], objectives: Sequence[str]) -> list[Point]:
    """Feasible points with finite values for every objective: the candidates for a front."""
    out = []
    for p in points:
        if not p.feasible:
            continue
        try:
            vals = [p.value(o) for o in objectives]
        except KeyError:
            continue
        if all(math.isfinite(v) for v in vals):
            out.append(p)
    return out


def device_front(points: Sequence[Point], device: str) -> DeviceFront:
    """The Top-1 / speed front on one device (lt's plot), with within-noise points, knee and HV."""
    objs = ["top1", f"speed:{device}"]
    pts = _usable(points, objs)
    if not pts:
        return DeviceFront(device, objs, [], [], None, 0.0, [])
    dirs = directions_of(objs)
    v = values_of(pts, objs)
    m = pareto_mask(v, dirs)
    records = [p.tokens() for p in pts]
    if all(r is not None for r in records):
        noise, rule = within_noise_paired(records, v[:, 1:], dirs[1:], m), NOISE_PAIRED
    else:
        ci = np.array([p.record.top1_ci for p in pts], dtype=float)
        noise, rule = within_noise_mask(ci, v[:, 1:], dirs[1:], m), NOISE_WILSON
    k = knee_index(v, dirs, m)
    ref = default_reference(v, dirs)
    order = sorted(np.flatnonzero(m), key=lambda i: (-v[i, 1], -v[i, 0], pts[i].number))
    return DeviceFront(
        device, objs, [pts[i].number for i in order], [pts[i].number for i in np.flatnonzero(noise)],
        None if k is None else pts[k].number, hypervolume(v[m], dirs, ref), [float(x) for x in ref], rule,
    )


def analyze(study=None, *, points: Sequence[Point] | None = None, info: StudyInfo | None = None,
            objectives: Sequence[str] | None = None, reference: Sequence[float] | None = None) -> Analysis:
    """Fronts of a study (or of given points): the full-objective front, ranks, knee, hypervolume
    (reference point stated in `Analysis.reference`) and a Top-1 / speed front per device."""
    pts = list(points) if points is not None else complete_points(study)
    info = info or study_info(study, pts)
    objs = list(objectives or info.objectives)
    info.objectives = objs
    usable = _usable(pts, objs)
    dirs = directions_of(objs)
    if usable:
        v = values_of(usable, objs)
        ranks_arr = nondominated_ranks(v, dirs)
        m = ranks_arr == 0
        ref = np.asarray(reference, dtype=float) if reference is not None else default_reference(v, dirs)
        hv = hypervolume(v[m], dirs, ref)
        k = knee_index(v, dirs, m)
        front = [usable[i].number for i in np.flatnonzero(m)]
        ranks = {p.number: int(r) for p, r in zip(usable, ranks_arr)}
        knee = None if k is None else usable[k].number
    else:
        ref, hv, front, ranks, knee = np.zeros(len(objs)), 0.0, [], {}, None
    devices = {d: device_front(pts, d) for d in info.devices}
    return Analysis(info, pts, front, ranks, knee, float(hv), [float(x) for x in ref], devices)


def records_by_config(points: Iterable[Point]) -> dict[str, Point]:
    """First COMPLETE trial of each canonical config string, in trial order."""
    out: dict[str, Point] = {}
    for p in points:
        out.setdefault(p.config, p)
    return out


def optuna_front_numbers(study) -> list[int]:
    """Trial numbers of Optuna's `best_trials` (for cross-checks)."""
    return sorted(t.number for t in study.best_trials)


# --- opening studies ---------------------------------------------------------------------------
def open_storage(storage: str):
    """An Optuna storage from a URL (`sqlite:///x.db`, `postgresql://...`) or a journal file path."""
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage)
    if not path.exists():
        raise FileNotFoundError(f"no study storage at {storage}; give a study .toml, a journal file or a storage URL")
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(target: str | Path, study_name: str | None = None, storage: str | None = None):
    """Load a study from a study file (`studies/x.toml`, through sweep.space / sweep.study; `storage`
    overrides its storage URL as in `sweep run --storage`), a journal file (`studies/.runs/x.log`)
    or a storage URL; `study_name` picks one of several in a storage."""
    import optuna

    target = str(target)
    if target.endswith(".toml"):
        from sweep.space import load_spec
        from sweep.study import load_study

        return load_study(load_spec(target, storage=storage))
    if storage:
        raise ValueError("--storage goes with a study file (.toml); give the journal file or URL as STUDY instead")
    storage = open_storage(target)
    if study_name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if len(names) != 1:
            raise ValueError(f"{target} holds {len(names)} studies ({', '.join(names) or 'none'}); name one with --study-name")
        study_name = names[0]
    return optuna.load_study(study_name=study_name, storage=storage)


__all__ = [
    "Analysis", "DeviceFront", "Point", "StudyInfo", "analyze", "complete_points", "default_reference",
    "device_front", "directions_of", "front_2d", "front_indices", "front_of", "hypervolume",
    "intervals_overlap", "knee_index", "nondominated_ranks", "open_storage", "open_study", "optuna_front_numbers", "pareto_mask",
    "records_by_config", "study_info", "values_of", "wilson_interval", "within_noise_mask", "within_noise_paired",
    "NOISE_PAIRED", "NOISE_WILSON",
]

