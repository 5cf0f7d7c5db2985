"""Preparing a run: create or load the study, recover dead workers' trials, queue a grid's configs.

Grids: every config of the space (after dropping configs dominated a priori, `sweep.equivalence`)
is queued once as a WAITING trial with fixed params, under the queue's guard, skipping configs
already present in any state, so concurrent `sweep run`s on any hosts never queue one twice.
Optuna's GridSampler is not used: with parallel workers it re-runs configs.

Other samplers (nsga2, tpe, gp): workers ask Optuna's sampler for new trials while the budget has
room (`sweep.study.worker`). TPE runs with constant liar, GP accounts for running trials itself
and NSGA-II samples from the finished population, so parallel workers do not all propose the same
point. Each worker's sampler is seeded from the study seed, the worker index and the number of
trials already in the study (samplers are not stored with a study).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState

from sweep.equivalence import representatives
from sweep.records import QUEUED_CONFIG
from sweep.space import StudySpec
from sweep.study.queue import TrialQueue, open_queue
from sweep.study.recovery import requeue_params
from sweep.study.storage import load_study
from sweep.study.trials import superseded_numbers


@dataclass
class Prepared:
    study: optuna.Study
    total: int  # trials the run aims at (grid: configs planned; samplers: n_trials)
    size: int  # configs in the space
    skipped: int  # grid configs skipped as dominated a priori
    enqueued: int  # grid configs queued by this call
    recovered: list[int] = field(default_factory=list)
    requeued_failed: int = 0
    queue: TrialQueue | None = None


def perf_cost(spec: StudySpec) -> Callable[[Any], list[float] | None]:
    """Cost vector (per device: -speed, ttft) from engine.perf.model, None when it cannot price a config."""
    try:
        from engine.perf import model as perf
    except Exception:  # noqa: BLE001
        return lambda mc: None

    def cost(mc):
        try:
            out = []
            for d in spec.devices:
                r = perf.predict(spec.model, d, mc, **spec.perf)
                out += [-float(r.speed_tsu), float(r.ttft_ms)]
            return out
        except Exception:  # noqa: BLE001 - fall back to phase counts
            return None

    return cost


def plan_grid(spec: StudySpec):
    """(kept [(params, config)], skipped [(config, same_as config)]) for a grid study."""
    items = list(spec.space.grid())
    red = representatives([mc for _, mc in items], perf_cost(spec))
    kept = [items[i] for i in red.keep]
    skipped = [(items[i][1], items[j][1]) for i, j in sorted(red.skipped.items())]
    return kept, skipped


def _requeue_failed(study: optuna.Study, trials, configs: bool) -> dict[str, int] | int:
    """Real failures to queue again (`--retry-failed`). Grids (`configs`): {config: trial number}
    of failed configs never completed (queued with the grid); samplers: queue their params now."""
    sups = superseded_numbers(trials)
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in sups]
    if configs:
        complete = {t.user_attrs.get("config") for t in trials if t.state == TrialState.COMPLETE}
        return {t.user_attrs.get("config"): t.number for t in failed if t.user_attrs.get("config") not in complete}
    n = 0
    for t in failed:
        params = requeue_params(t)
        if params is not None:
            attrs = {"requeued_from": t.number}
            if "config" in t.user_attrs:
                attrs["config"] = t.user_attrs["config"]
            study.enqueue_trial(params, user_attrs=attrs)
            n += 1
    return n


def _enqueue_grid(spec: StudySpec, study: optuna.Study, plan, retry_failed: bool) -> tuple[int, int, int, int]:
    """Queue the grid's missing configs (`plan`: plan_grid's); (planned, skipped, enqueued, re-queued failures)."""
    kept, skipped = plan
    if study.user_attrs.get("grid_planned") != len(kept):
        study.set_user_attr("grid_size", spec.space.size)
        study.set_user_attr("grid_planned", len(kept))
        study.set_user_attr("skipped_equivalent", len(skipped))
        study.set_user_attr("skipped_configs", [{"config": str(a), "same_as": str(b)} for a, b in skipped])
    trials = study.get_trials(deepcopy=False)
    sups = superseded_numbers(trials)
    present = {t.user_attrs.get("config") for t in trials if t.number not in sups and t.state != TrialState.PRUNED}
    retry = _requeue_failed(study, trials, configs=True) if retry_failed else {}
    present -= set(retry)
    enq = requeued = 0
    for params, mc in kept:
        c = str(mc)
        if c not in present:
            attrs: dict[str, Any] = {"config": c}
            if c in retry:
                attrs["requeued_from"] = retry[c]
                requeued += 1
            study.enqueue_trial(params, user_attrs=attrs)
            present.add(c)
            enq += 1
    return len(kept), len(skipped), enq, requeued


def enqueue_config(study: optuna.Study, mc, attrs: Mapping[str, Any]) -> bool:
    """Queue config `mc` as a trial of `study` from outside its space (the worker evaluates the
    `queued_config` string) unless a trial of it is complete, waiting or running; True if queued."""
    cfg = str(mc)
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("config") == cfg and t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING):
            return False
    study.enqueue_trial({}, user_attrs={"config": cfg, QUEUED_CONFIG: cfg, **attrs})
    return True


def prepare(spec: StudySpec, retry_failed: bool = False) -> Prepared:
    """Create or load the study, recover stale trials and (grids) queue the missing configs, all
    under the queue's guard (a flock on one machine, the database's lock across hosts)."""
    plan = plan_grid(spec) if spec.is_grid else None  # before the guard: it holds other hosts up
    queue = open_queue(spec)
    with queue.guard():
        study = load_study(spec, create=True, storage=queue.storage)
        recovered = queue.recover(study)
        if spec.is_grid:
            total, skipped, enq, requeued = _enqueue_grid(spec, study, plan, retry_failed)
        else:
            total, skipped, enq = int(spec.sampler.n_trials or 0), 0, 0
            requeued = _requeue_failed(study, study.get_trials(deepcopy=False), configs=False) if retry_failed else 0
    return Prepared(study, total, spec.space.size, skipped, enq, recovered, requeued, queue)


def make_sampler(spec: StudySpec, worker_index: int = 0, n_existing: int = 0):
    """The study's sampler for one worker (seeded per worker and per resume point)."""
    s = spec.sampler
    seed = (s.seed * 1_000_003 + worker_index * 7919 + n_existing * 104_729) % (2**32)
    if s.kind == "grid":
        return optuna.samplers.RandomSampler(seed=seed)  # never samples: every grid trial is enqueued
    if s.kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup, constant_liar=True, multivariate=True)
    if s.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup)
    raise ValueError(f"unknown sampler {s.kind!r}")
