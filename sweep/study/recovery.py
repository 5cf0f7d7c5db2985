"""Recovery of trials whose worker died: fail the RUNNING trial and queue its config again.

A worker is dead when its process is gone on this host (pid and start time, `identity`), when it
never wrote who it is within NO_WORKER_GRACE_S (or no worker of a journal study is alive at all),
or when its heartbeats stopped for `stale_s()`. On a shared database the last test is Optuna's own
heartbeat (`fail_stale_trials` with `RequeueStaleTrial` as the storage's stale-trial callback),
so any worker on any host recovers a dead host's trial; elsewhere it is the `heartbeat` user
attribute the workers refresh.

The params queued again are the trial's whole fixed params: a worker killed inside `space.suggest`
leaves only some on the trial, and re-queuing those would let the sampler fill the rest at random
(another config under the old trial's name). That is why Optuna's RetryHeartbeatStaleTrialCallback
(which re-queues `trial.params` and copies the dead worker's user attributes) is not used.
"""
from __future__ import annotations

import time
import uuid
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from sweep.records import ALLOCATION, QUEUED_CONFIG
from sweep.space import StudySpec
from sweep.study import identity, locks
from sweep.study.optuna_compat import storage_of, trial_id_of_number
from sweep.study.storage import stale_s

NO_WORKER_GRACE_S = 60.0  # a RUNNING trial with no worker attribute this old is stale
MAX_DEATHS = 3  # a config whose worker died this many times is failed for good


def is_stale(t: FrozenTrial, now: float | None = None, nobody_since: float | None = None,
             heartbeat_attr: bool = True) -> bool:
    """A RUNNING trial whose worker is gone. `nobody_since`: a time at which no worker of the
    study was alive on this machine (journal storage: every worker is on this machine, so every
    trial started before then is dead, whatever host name its worker gave).
    `heartbeat_attr=False` leaves the heartbeat test to Optuna's (shared databases)."""
    now = time.time() if now is None else now
    started = t.datetime_start.timestamp() if t.datetime_start else now
    if nobody_since is not None and started <= nobody_since:  # no worker alive since it started
        return True
    w = t.user_attrs.get("worker")
    if not w:  # claimed, but its worker has not written who it is (yet, or ever: killed in between)
        return now - started > NO_WORKER_GRACE_S
    if identity.on_this_host(w) and not identity.pid_alive(w):
        return True
    hb = float(t.user_attrs.get("heartbeat", 0) or 0)
    return heartbeat_attr and bool(hb) and now - hb > stale_s()


def trial_id(study: optuna.Study, number: int) -> int:
    return trial_id_of_number(study, number)


def requeue_params(t: FrozenTrial) -> dict | None:
    """The whole param assignment that queues `t`'s config again, or None when it is unknown
    (a sampled trial killed before its config was recorded)."""
    fixed = t.system_attrs.get("fixed_params") or {}
    if t.user_attrs.get(QUEUED_CONFIG):  # queued by config, not params
        return dict(fixed)
    if fixed:
        return {**t.params, **fixed}
    if t.params and "config" in t.user_attrs:
        return dict(t.params)
    return None


def _requeue(study: optuna.Study, t: FrozenTrial, params: dict, deaths: int, reason: str | None = None) -> None:
    attrs = {"requeued_from": t.number, "deaths": deaths}
    for k in ("config", QUEUED_CONFIG, ALLOCATION):
        if k in t.user_attrs:
            attrs[k] = t.user_attrs[k]
    if reason:
        attrs["requeue_reason"] = reason
    study.enqueue_trial(params, user_attrs=attrs)


def _who(t: FrozenTrial) -> str:
    w = t.user_attrs.get("worker") or {}
    return f"pid {w.get('pid')} on {w.get('host')}" if w else "unknown worker"


def fail_and_requeue(study: optuna.Study, t: FrozenTrial, reason: str, death: bool) -> bool:
    """Fail a RUNNING trial with `reason` and queue its params again (unless its worker died
    MAX_DEATHS times on it). Returns whether it was re-queued. Safe against a concurrent recovery:
    only the process whose token ends up on the trial re-queues it."""
    storage = storage_of(study)
    tid = trial_id(study, t.number)
    token = uuid.uuid4().hex
    deaths = int(t.user_attrs.get("deaths", 0)) + (1 if death else 0)
    params = requeue_params(t)
    requeue = params is not None and deaths < MAX_DEATHS
    if params is None:  # a sampled trial stopped before its params were all chosen
        reason = f"{reason}; its params were not all chosen yet, so the sampler proposes a new trial instead"
    elif death and deaths >= MAX_DEATHS:
        reason = f"{reason}; its worker died {deaths} times on this config, not re-queued"
    try:
        storage.set_trial_user_attr(tid, "recovered_by", token)
        storage.set_trial_user_attr(tid, "fail_reason", reason)
        if requeue or params is None:  # replaced (by the queued copy, or a new sample): not counted
            storage.set_trial_user_attr(tid, "superseded", True)
        storage.set_trial_state_values(tid, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if storage.get_trial(tid).user_attrs.get("recovered_by") != token:
        return False
    if requeue:
        _requeue(study, t, params, deaths)
    return requeue


class RequeueStaleTrial:
    """Optuna's stale-trial callback on a shared database: `fail_stale_trials` has failed `trial`
    (its heartbeats stopped for the grace period; only the process that failed it calls this):
    queue its whole params again with `requeued_from`, as `fail_and_requeue` does. The failed trial
    can take no attributes any more, so the reason goes on the queued copy (`requeue_reason`)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        deaths = int(trial.user_attrs.get("deaths", 0)) + 1
        params = requeue_params(trial)
        if params is not None and deaths < MAX_DEATHS:
            _requeue(study, trial, params, deaths,
                     f"worker stopped sending heartbeats ({_who(trial)}) while running the trial; re-queued")


def heartbeat_failed_reason(t: FrozenTrial) -> str:
    """The reason shown for a trial failed by Optuna's heartbeat check (it has no fail_reason)."""
    return f"worker stopped sending heartbeats ({_who(t)}); failed by another worker"


def recover_stale(study: optuna.Study, spec: StudySpec | None = None, heartbeats: bool = False) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker is gone; returns their numbers. With the
    `spec` of a journal-file study, a trial claimed by a worker killed before it wrote its
    identity is recovered at once when no worker is alive (instead of after NO_WORKER_GRACE_S).
    `heartbeats`: the storage has Optuna heartbeats (shared database): run its stale check first."""
    out = []
    if heartbeats:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        out += [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.number in before and "fail_reason" not in t.user_attrs]
    now = time.time()
    nobody = locks.nobody_since(spec, now)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, now, nobody, heartbeat_attr=not heartbeats):
            fail_and_requeue(study, t, f"worker died ({_who(t)}) while running the trial", death=True)
            out.append(t.number)
    return out
