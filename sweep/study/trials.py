"""Reading a study: its records, counts by state, and `status` (never writes to the storage).

Counts split FAIL in two: REQUEUED are trials failed because their worker died or was interrupted
and whose config was queued again (they are superseded by the copy), FAIL the real failures (the
evaluation raised, or a config whose worker died MAX_DEATHS times). So after a clean recovery
FAIL is 0, and `FAIL == 0` is a script's success test.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.records import TrialRecord
from sweep.space import StudySpec
from sweep.study import locks
from sweep.study.recovery import heartbeat_failed_reason, is_stale
from sweep.study.storage import StudyNotFound, load_study

STATES = ("COMPLETE", "FAIL", "REQUEUED", "RUNNING", "WAITING")


def records(study: optuna.Study) -> list[tuple[int, TrialRecord]]:
    """(trial number, TrialRecord) of every COMPLETE trial, in trial-number order."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "config" in t.user_attrs and "top1" in t.user_attrs:
            out.append((t.number, TrialRecord.from_user_attrs(t.user_attrs)))
    return sorted(out, key=lambda x: x[0])


def superseded_numbers(trials: list[FrozenTrial]) -> set[int]:
    """FAIL trials whose config was queued again: marked `superseded` when failed by the runner,
    or named by a later trial's `requeued_from` (heartbeat recovery, `--retry-failed`)."""
    out = {t.number for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("superseded")}
    out |= {int(t.user_attrs["requeued_from"]) for t in trials if "requeued_from" in t.user_attrs}
    return out


@dataclass
class Tally:
    counts: dict[str, int]  # STATES (+ PRUNED when any); FAIL: real failures, REQUEUED: superseded
    done: int  # COMPLETE + FAIL
    slots: int  # trials that count against a sampler budget

    @property
    def superseded(self) -> int:
        return self.counts["REQUEUED"]

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> "Tally":
        counts = {s: 0 for s in STATES}
        sups = superseded_numbers(trials)
        for t in trials:
            name = "REQUEUED" if t.state == TrialState.FAIL and t.number in sups else t.state.name
            counts[name] = counts.get(name, 0) + 1
        done = counts["COMPLETE"] + counts["FAIL"]
        return cls(counts, done, len(trials) - counts["REQUEUED"] - counts.get("PRUNED", 0))


def fail_reason(t: FrozenTrial, trials: list[FrozenTrial]) -> str:
    """Why a FAIL trial failed: its own `fail_reason`, else (failed by Optuna's heartbeat check,
    which leaves none) the reason on the copy that replaced it."""
    if "fail_reason" in t.user_attrs:
        return t.user_attrs["fail_reason"]
    for c in trials:
        if c.user_attrs.get("requeued_from") == t.number and "requeue_reason" in c.user_attrs:
            return c.user_attrs["requeue_reason"]
    return heartbeat_failed_reason(t) if "worker" in t.user_attrs else "(no reason recorded)"


def status(spec: StudySpec) -> dict:
    """Counts by state, failures, running trials and the workers per host running them; never
    writes to the storage."""
    try:
        study = load_study(spec, create=False)
    except StudyNotFound as exc:
        return {"counts": {s: 0 for s in STATES}, "failures": [], "running": [], "hosts": {}, "note": str(exc),
                "total": None, "skipped": None}
    trials = study.get_trials(deepcopy=False)
    tally = Tally.of(trials)
    sups = superseded_numbers(trials)
    failures, running = [], []
    hosts: dict[str, list[int]] = {}
    nobody = locks.nobody_since(spec, time.time())
    for t in trials:
        if t.state == TrialState.FAIL:
            failures.append({"number": t.number, "config": t.user_attrs.get("config", ""),
                             "reason": fail_reason(t, trials), "superseded": t.number in sups})
        elif t.state == TrialState.RUNNING:
            w = t.user_attrs.get("worker") or {}
            alive = not is_stale(t, nobody_since=nobody)
            running.append({"number": t.number, "config": t.user_attrs.get("config", ""), "worker": w, "alive": alive})
            if w and alive:
                hosts.setdefault(str(w.get("host")), []).append(int(w.get("pid", -1)))
    attrs = study.user_attrs
    total = attrs.get("grid_planned") if spec.is_grid else spec.sampler.n_trials
    return {"counts": tally.counts, "failures": failures, "running": running, "total": total,
            "hosts": {h: sorted(set(p)) for h, p in sorted(hosts.items())},
            "done": tally.done, "skipped": attrs.get("skipped_equivalent"), "note": ""}
