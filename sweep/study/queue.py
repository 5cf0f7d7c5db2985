"""The trial queue of a study: one small interface, one implementation per kind of storage.

Grids are enqueued once as WAITING trials and claimed through the storage's atomic
WAITING -> RUNNING transition (journal file; PostgreSQL / MySQL row locks). What must not run
twice at once (enqueue, recovery, the sampler-budget check with `ask`) runs under `guard()`:

- `LocalQueue` (journal file, SQLite): every worker is on this machine; the guard is a flock, and
  it also clears a journal lock file left by a process killed while appending.
- `SharedQueue` (PostgreSQL, MySQL): workers on many hosts; the guard is the database server's
  advisory lock for the study, and recovery adds Optuna's heartbeat check, so any worker fails
  and re-queues the trial of a host that died. Idle workers wait while other workers' trials
  run, because those may come back to the queue.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from sweep.space import StudySpec
from sweep.study import locks
from sweep.study.optuna_compat import storage_of, study_id
from sweep.study.recovery import RequeueStaleTrial, recover_stale
from sweep.study.storage import backend, lock, open_storage


class TrialQueue:
    """The queue of one study on one opened storage (`self.storage`)."""

    waits_for_others = False  # idle workers wait for others' RUNNING trials (they may be re-queued)

    def __init__(self, spec: StudySpec, storage):
        self.spec = spec
        self.storage = storage

    def guard(self) -> contextlib.AbstractContextManager:
        """Exclusive across every process that can work this study."""
        raise NotImplementedError

    def recover(self, study: optuna.Study) -> list[int]:
        """Fail and re-queue the trials of dead workers (call under `guard`); their numbers."""
        raise NotImplementedError

    def claim(self, study: optuna.Study) -> optuna.Trial | None:
        """Move one WAITING trial to RUNNING for this worker, or None when none waits."""
        storage = storage_of(study)
        sid = study_id(study)
        for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,)):
            tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
            try:
                if storage.set_trial_state_values(tid, TrialState.RUNNING):
                    return optuna.Trial(study, tid)
            except UpdateFinishedTrialError:
                continue
        return None

    def beat(self, study: optuna.Study, trial_id: int) -> None:
        """A heartbeat of a running trial (its `heartbeat` user attribute: unix time)."""
        storage_of(study).set_trial_user_attr(trial_id, "heartbeat", time.time())


class LocalQueue(TrialQueue):
    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        with locks.study_lock(self.spec):
            locks.clear_stale_journal_lock(self.spec)
            yield

    def recover(self, study: optuna.Study) -> list[int]:
        return recover_stale(study, self.spec)


class SharedQueue(TrialQueue):
    waits_for_others = True

    def guard(self):
        return lock(self.spec.storage, f"ttsweep:study:{self.spec.name}")

    def recover(self, study: optuna.Study) -> list[int]:
        return recover_stale(study, self.spec, heartbeats=True)

    def beat(self, study: optuna.Study, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)  # Optuna's heartbeat (server time), read by fail_stale_trials
        super().beat(study, trial_id)


def storage_for_queue(url: str, create: bool = True):
    """Open a storage for workers: with Optuna heartbeats and `RequeueStaleTrial` on a shared database."""
    return open_storage(url, create=create, stale_callback=RequeueStaleTrial() if backend(url).shared else None)


def queue_for(spec: StudySpec, storage) -> TrialQueue:
    """The queue class for the spec's kind of storage, on an opened `storage`."""
    return (SharedQueue if backend(spec.storage).shared else LocalQueue)(spec, storage)


def open_queue(spec: StudySpec, create: bool = True) -> TrialQueue:
    """Open the spec's storage (with Optuna heartbeats on a shared database) and its queue."""
    return queue_for(spec, storage_for_queue(spec.storage, create))
