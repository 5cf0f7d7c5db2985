"""Fronts, ranks, hypervolume, knee and noise flags (sweep.pareto)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from synthetic_study import OBJECTIVES, build_study  # noqa: E402  (test fixture)

from sweep import pareto  # noqa: E402
from sweep.objectives import direction  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX2 = ["maximize", "maximize"]


def brute_front(v, dirs):
    s = np.array([1 if d == "maximize" else -1 for d in dirs])
    w = np.asarray(v, float) * s
    return [i for i in range(len(w)) if not any((w[j] >= w[i]).all() and (w[j] > w[i]).any() for j in range(len(w)))]


# --- hand-built point sets -----------------------------------------------------------------
def test_one_point_is_its_own_front_and_knee():
    assert pareto.pareto_mask([[88.0, 100.3]], MAX2).tolist() == [True]
    assert pareto.knee_index([[88.0, 100.3]], MAX2) == 0
    assert pareto.nondominated_ranks([[88.0, 100.3]], MAX2).tolist() == [0]


def test_empty_set():
    assert pareto.pareto_mask(np.zeros((0, 2)), MAX2).tolist() == []
    assert pareto.hypervolume(np.zeros((0, 2)), MAX2, [0, 0]) == 0.0
    assert pareto.knee_index(np.zeros((0, 2)), MAX2) is None


def test_duplicates_are_all_kept():
    v = [[90, 99.0], [90, 99.0], [85, 100.3], [85, 100.3], [84, 98.0]]
    assert pareto.pareto_mask(v, MAX2).tolist() == [True, True, True, True, False]


def test_ties_on_one_objective():
    # equal Top-1: only the faster one survives; equal speed: only the more accurate
    v = [[88, 95.2], [88, 96.8], [87, 96.8], [91, 94.4]]
    assert pareto.pareto_mask(v, MAX2).tolist() == [False, True, False, True]


def test_minimize_direction():
    # Top-1 (max) vs TTFT (min)
    v = [[85, 69], [88, 55], [87, 51], [91, 60], [89, 49]]
    assert pareto.front_indices(v, ["maximize", "minimize"]).tolist() == [3, 4]


def test_ranks_peel_fronts():
    v = [[3, 1], [1, 3], [2, 2], [1, 1], [0, 0], [2, 1]]
    assert pareto.nondominated_ranks(v, MAX2).tolist() == [0, 0, 0, 2, 3, 1]


@pytest.mark.parametrize("seed", range(12))
def test_random_sets_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 60)), int(rng.integers(1, 5))
    v = rng.integers(0, 6, size=(n, k)).astype(float)  # small integers: many ties and duplicates
    dirs = [["maximize", "minimize"][i] for i in rng.integers(0, 2, size=k)]
    assert pareto.front_indices(v, dirs).tolist() == brute_front(v, dirs)


def test_two_d_hypervolume_by_hand():
    # staircase from (3,1),(2,2),(1,3) to reference (0,0): 3 + 2 + 1 = 6
    v = [[3, 1], [2, 2], [1, 3], [1, 1]]
    assert pareto.hypervolume(v, MAX2, [0, 0]) == pytest.approx(6.0)
    # minimisation mirror
    assert pareto.hypervolume(-np.asarray(v, float), ["minimize"] * 2, [0, 0]) == pytest.approx(6.0)
    # points not beating the reference add nothing
    assert pareto.hypervolume([[3, 1]], MAX2, [3, 0]) == 0.0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_matches_optuna(k):
    from optuna._hypervolume import compute_hypervolume  # private: a cross-check only

    rng = np.random.default_rng(k)
    v = rng.random((25, k)) * 10
    dirs = ["maximize", "minimize", "maximize", "minimize"][:k]
    ref = pareto.default_reference(v, dirs)
    s = np.array([1 if d == "maximize" else -1 for d in dirs])
    expect = compute_hypervolume(-(v * s), -(ref * s))
    assert pareto.hypervolume(v, dirs, ref) == pytest.approx(expect, rel=1e-9)


def test_default_reference_is_beyond_the_worst_point():
    v = np.array([[85.0, 100.0], [91.0, 90.0]])
    ref = pareto.default_reference(v, ["maximize", "minimize"])
    # pad = max(10% of the observed range, 1% of the worst value)
    assert ref[0] == pytest.approx(85 - 0.85) and ref[1] == pytest.approx(100 + 1.0)


def test_knee_of_a_convex_front():
    v = [[0, 10], [1, 9.5], [2, 9], [8, 8], [9, 2], [10, 0]]
    assert pareto.knee_index(v, MAX2) == 3


def test_within_noise():
    # front: A (92 +-2, speed 90), B (89 +-2, speed 96), C (86 +-2, speed 100)
    # D: 88.5 at speed 93 -> dominated by B, whose interval it overlaps (B is faster) -> within noise
    # F: 91 at speed 90 -> dominated by A, equal speed and overlapping -> within noise
    # G: 85 at speed 85 -> overlaps C (faster): its true Top-1 may beat C's -> within noise
    # E: 80 +-1 at speed 99 -> only C is as fast, and their intervals are disjoint -> not
    # H: 83.7 +-0.2 at speed 97 -> only C is faster, and C (84-88) is disjoint -> not
    top1 = np.array([92, 89, 86, 88.5, 91, 85, 80.0, 84.0])
    speed = np.array([[90.0], [96.0], [100.0], [93.0], [90.0], [85.0], [99.0], [97.0]])
    ci = np.stack([top1 - 2, top1 + 2], axis=1)
    ci[6] = [79, 81]
    ci[7] = [83.5, 83.9]  # H: overlaps nothing faster (C is 84-88)
    front = pareto.pareto_mask(np.column_stack([top1, speed]), MAX2)
    assert front.tolist() == [True, True, True, False, False, False, False, False]
    noise = pareto.within_noise_mask(ci, speed, ["maximize"], front)
    assert noise.tolist() == [False, False, False, True, True, True, False, False]


def test_wilson_interval():
    lo, hi = pareto.wilson_interval(450, 511)
    assert 84.9 < lo < 85.3 and 90.4 < hi < 90.8
    assert pareto.wilson_interval(0, 10)[0] == 0.0 and pareto.wilson_interval(10, 10)[1] == pytest.approx(100.0)


# --- agreement with Optuna ----------------------------------------------------------------
def _random_study(rng, objectives, n):
    study = optuna.create_study(directions=[direction(o) for o in objectives])
    for _ in range(n):
        study.add_trial(optuna.trial.create_trial(values=list(rng.integers(0, 5, size=len(objectives)).astype(float))))
    return study


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_optuna_best_trials(seed):
    rng = np.random.default_rng(100 + seed)
    objectives = ["top1", "top5", "speed:N150", "ttft:N150"]
    for r in range(1, len(objectives) + 1):
        for subset in itertools.combinations(objectives, r):
            study = _random_study(rng, subset, 40)
            v = np.array([t.values for t in study.trials])
            ours = pareto.front_indices(v, [direction(o) for o in subset]).tolist()
            assert ours == sorted(t.number for t in study.best_trials), subset


def test_synthetic_study_front_matches_optuna():
    study = build_study()
    a = pareto.analyze(study)
    assert a.info.objectives == OBJECTIVES
    assert a.front == pareto.optuna_front_numbers(study)
    assert a.knee in a.front
    assert a.hypervolume > 0 and len(a.reference) == len(OBJECTIVES)
    for dev, df in a.devices.items():
        # the device front is the 2-D front of (top1, speed:dev), fastest first
        pts = pareto.front_2d(a.points, "top1", f"speed:{dev}")
        assert sorted(df.front) == sorted(p.number for p in pts)
        speeds = [a.point(n).record.speed[dev] for n in df.front]
        assert speeds == sorted(speeds, reverse=True)
        assert not set(df.within_noise) & set(df.front)
    frame = a.frame()
    assert len(frame) == 12 and frame["front"].sum() == len(a.front)


def test_analysis_on_a_subset_of_objectives():
    study = build_study()
    a = pareto.analyze(study, objectives=["top1", "speed:N150"])
    assert a.front == sorted(a.devices["N150"].front)


def test_constraints_make_points_infeasible_as_in_optuna():
    # a Top-1 floor of 89%: Optuna's best_trials drops the infeasible points, so do we
    study = build_study(constraints=lambda r: {"top1_min": 89.0 - r.top1})
    a = pareto.analyze(study)
    infeasible = {p.number for p in a.points if not p.feasible}
    assert infeasible and not infeasible & set(a.front_numbers())
    assert a.front == pareto.optuna_front_numbers(study)
    assert not infeasible & {n for d in a.devices.values() for n in d.within_noise}
    assert a.frame().set_index("trial").loc[sorted(infeasible), "feasible"].eq(False).all()
