"""Per-layer allocation: one choice per (decoder layer, family) that minimises the summed damage of a
sensitivity profile under a device budget (speed, TTFT, weight memory per chip).

It is a multiple-choice knapsack, solved exactly as a 0-1 integer program by scipy.optimize.milp
(HiGHS branch and bound): a binary x per option, one option per (layer, family), the summed
predicted cost deltas within the budget, the summed damage minimised. Costs come from
engine.perf.model: each option's change of the decode step time, TTFT and weight bytes when only that
layer's family changes (the performance model sums per-layer costs). The activation dtype also
changes the bytes of the other families' linears, so the sum is checked by predicting the whole
allocated config; when it misses the budget, the budget is tightened by the miss and the program
solved again (`rounds` counts these solves).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from engine.vocab.config import ModelConfig
from sweep.probes import ProbeSpace, family

SOLVER = "scipy.optimize.milp (HiGHS)"
MAX_ROUNDS = 8


@dataclass(frozen=True)
class Budget:
    """What the allocated config must satisfy on the device (None: no limit)."""

    min_speed: float | None = None  # decode t/s/u
    max_ttft: float | None = None  # ms
    max_weights_gb: float | None = None  # weights per chip, GB

    def __post_init__(self) -> None:
        if self.min_speed is None and self.max_ttft is None and self.max_weights_gb is None:
            raise ValueError("a budget needs --min-speed, --max-ttft or --max-weights-gb")
        for name in ("min_speed", "max_ttft", "max_weights_gb"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, not {v}")

    @property
    def label(self) -> str:
        """File-name part: `speed110`, `ttft30`, `weights0.2` joined by `-`."""
        parts = []
        for key, v in (("speed", self.min_speed), ("ttft", self.max_ttft), ("weights", self.max_weights_gb)):
            if v is not None:
                parts.append(f"{key}{v:.10g}")
        return "-".join(parts)

    def violation(self, speed: float, ttft: float, weights_gb: float) -> tuple[float, float, float]:
        """How far each limit is missed (0 where met): step time us, TTFT ms, GB."""
        dv = max(0.0, 1e6 / speed - 1e6 / self.min_speed) if self.min_speed else 0.0
        return (dv, max(0.0, ttft - self.max_ttft) if self.max_ttft else 0.0,
                max(0.0, weights_gb - self.max_weights_gb) if self.max_weights_gb else 0.0)


@dataclass(frozen=True)
class Option:
    layer: int
    family: str
    choice: str
    damage: float
    d_step_us: float
    d_ttft_ms: float
    d_weights_gb: float


@dataclass
class Problem:
    """Every (layer, family) group's options with their damage and cost deltas over the base."""

    model: str
    device: str
    space: ProbeSpace
    perf: dict
    step_us: float
    ttft_ms: float
    weights_gb: float
    options: list[Option]
    groups: list[list[int]]  # option indices of each (layer, family)


@dataclass
class Allocation:
    budget: Budget
    config: ModelConfig
    changes: list[tuple[int, str, str]]  # (layer, family, choice) that differ from the base
    predicted_damage: float
    speed: float
    ttft_ms: float
    weights_gb: float
    rounds: int
    solve_s: float
    solver: str = SOLVER
    extra: dict = field(default_factory=dict)


class Infeasible(ValueError):
    """No allocation meets the budget on this device."""


def _perf(model: str, device: str, mc: ModelConfig, perf_kw: Mapping) -> tuple[float, float, float]:
    from engine.perf import model as perf

    r = perf.predict(model, device, mc, **perf_kw)
    return r.decode_step_ms * 1e3, r.ttft_ms, r.weights_gb_per_chip


def build_problem(model: str, device: str, space: ProbeSpace, damage: Mapping[tuple[int, str, str], float],
                  perf_kw: Mapping | None = None) -> Problem:
    """Price every option of `space` on `device`; `damage` maps (layer, family, choice) -> damage
    (the base's own choice of each group costs and damages nothing). KeyError names a probe
    missing from the profile."""
    perf_kw = dict(perf_kw or {})
    base_cost = _perf(model, device, space.base, perf_kw)
    priced: dict = {}
    options: list[Option] = []
    groups: list[list[int]] = []
    for layer in space.layers:
        for name, choices in space.families.items():
            own = family(name).choice_of(space.base.layers[layer])
            idx = []
            for c in dict.fromkeys((own, *choices)):
                cfg = space.layer_config(layer, name, c)
                key = (layer, cfg)
                if key not in priced:
                    layers = list(space.base.layers)
                    layers[layer] = cfg
                    cost = _perf(model, device, ModelConfig(tuple(layers)), perf_kw)
                    priced[key] = tuple(a - b for a, b in zip(cost, base_cost))
                if c == own:
                    dmg = 0.0
                else:
                    try:
                        dmg = float(damage[(layer, name, c)])
                    except KeyError:
                        raise KeyError(f"the profile has no probe L{layer}.{name}={c}; re-run `sweep sensitivity`") from None
                    if not math.isfinite(dmg):
                        raise ValueError(f"the profile's damage of L{layer}.{name}={c} is {dmg}; re-measure that probe")
                idx.append(len(options))
                options.append(Option(layer, name, c, dmg, *priced[key]))
            groups.append(idx)
    return Problem(model, device, space, perf_kw, *base_cost, options, groups)


def solve(problem: Problem, limits: tuple[float | None, float | None, float | None]) -> list[int] | None:
    """The exact minimum-damage choice (one option index per group) whose summed deltas keep the
    step time, TTFT and weights within `limits` (absolute; None: free); None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    opts = problem.options
    n = len(opts)
    step = np.array([o.d_step_us for o in opts])
    # minimise damage; among equal damage prefer the faster option (a tie-break far below any damage)
    scale = float(np.abs(step).max() or 1.0)
    c = np.array([o.damage for o in opts]) + 1e-9 * step / scale
    a_eq = np.zeros((len(problem.groups), n))
    for g, idx in enumerate(problem.groups):
        a_eq[g, idx] = 1.0
    cons = [LinearConstraint(a_eq, 1.0, 1.0)]
    for limit, base, attr in zip(limits, (problem.step_us, problem.ttft_ms, problem.weights_gb),
                                 ("d_step_us", "d_ttft_ms", "d_weights_gb")):
        if limit is not None:
            cons.append(LinearConstraint(np.array([[getattr(o, attr) for o in opts]]), -np.inf, limit - base))
    with _quiet_stdout():
        res = milp(c, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        return None
    x = np.round(res.x).astype(int)
    return [next(j for j in idx if x[j]) for idx in problem.groups]


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS (inside scipy) prints a debug line to the C stdout on some branch-and-bound runs; keep
    it off the command's output."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def config_of(problem: Problem, chosen: Sequence[int]) -> ModelConfig:
    """The ModelConfig that takes option `chosen[g]` in every group."""
    layers = list(problem.space.base.layers)
    for j in chosen:
        o = problem.options[j]
        layers[o.layer] = layers[o.layer].replace(**family(o.family).changes(o.choice, layers[o.layer], problem.space.natural))
    return ModelConfig(tuple(layers))


def allocate(problem: Problem, budget: Budget) -> Allocation:
    """Solve, predict the whole config, tighten by any miss and solve again (at most MAX_ROUNDS)."""
    t0 = time.perf_counter()
    limits = [1e6 / budget.min_speed if budget.min_speed else None, budget.max_ttft, budget.max_weights_gb]
    for rounds in range(1, MAX_ROUNDS + 1):
        chosen = solve(problem, tuple(limits))
        if chosen is None:
            fastest = fastest_speed(problem)
            raise Infeasible(f"no allocation meets {budget.label} on {problem.device}: the fastest choices reach "
                             f"{fastest:.1f} t/s/u; relax the budget")
        mc = config_of(problem, chosen)
        step, ttft, wgb = _perf(problem.model, problem.device, mc, problem.perf)
        miss = budget.violation(1e6 / step, ttft, wgb)
        if not any(miss):
            opts = [problem.options[j] for j in chosen]
            changes = [(o.layer, o.family, o.choice) for o in opts
                       if o.choice != family(o.family).choice_of(problem.space.base.layers[o.layer])]
            return Allocation(budget, mc, changes, float(sum(o.damage for o in opts)), 1e6 / step, ttft, wgb, rounds,
                              time.perf_counter() - t0)
        limits = [None if lim is None else lim - m * 1.001 - 1e-9 for lim, m in zip(limits, miss)]
    raise Infeasible(f"{budget.label} on {problem.device}: the summed costs kept missing the predicted whole-config "
                     f"cost after {MAX_ROUNDS} solves; relax the budget")


def fastest_speed(problem: Problem) -> float:
    """Predicted speed of the config that takes every group's fastest option."""
    chosen = [min(idx, key=lambda j: problem.options[j].d_step_us) for idx in problem.groups]
    return 1e6 / _perf(problem.model, problem.device, config_of(problem, chosen), problem.perf)[0]


def front_budgets(problem: Problem, k: int) -> list[Budget]:
    """`k` speed budgets evenly spaced above the least-damage config's speed up to the fastest
    config's, each rounded down (to 0.1 t/s/u, finer when the whole spread is narrower) so the
    fastest stays feasible."""
    if k < 1:
        raise ValueError(f"--front needs K >= 1, not {k}")
    best = [min(idx, key=lambda j: problem.options[j].damage) for idx in problem.groups]
    lo = 1e6 / _perf(problem.model, problem.device, config_of(problem, best), problem.perf)[0]
    hi = fastest_speed(problem)
    speeds = np.linspace(lo, hi, k + 1)[1:] if hi > lo else [hi]
    unit = 10.0 ** min(-1, math.floor(math.log10(hi - lo)) - 1) if hi > lo else 0.1  # resolves the spread
    floored = dict.fromkeys(round(math.floor(s / unit) * unit, 10) for s in speeds)
    return [Budget(min_speed=s) for s in floored]


def brute_force(problem: Problem, budget: Budget) -> tuple[float, ModelConfig] | None:
    """Every combination, priced by the whole-config prediction: (least damage, its config) among
    those within the budget (tests and tiny problems only)."""
    import itertools

    best = None
    for combo in itertools.product(*problem.groups):
        dmg = sum(problem.options[j].damage for j in combo)
        if best is not None and dmg >= best[0]:
            continue
        mc = config_of(problem, combo)
        step, ttft, wgb = _perf(problem.model, problem.device, mc, problem.perf)
        if not any(budget.violation(1e6 / step, ttft, wgb)):
            best = (dmg, mc)
    return best


def summed_damage(space: ProbeSpace, mc: ModelConfig, damage: Mapping[tuple[int, str, str], float]) -> float:
    """Sum of the profile's damage over the (layer, family) choices of `mc`, a choice read by its
    first key (a weight group's format: fidelities other than the natural one are not priced, so
    this ranks configs; their full evaluation decides). KeyError: a choice not profiled."""
    total = 0.0
    for i in space.layers:
        for name in space.families:
            fam = family(name)
            c = fam.choice_of(mc.layers[i])
            if c != fam.choice_of(space.base.layers[i]):
                total += damage[(i, name, c)]
    return total
