"""Run a study: worker processes on one Optuna storage, exact-once grids, samplers, resume, on one
machine (journal file) or on many hosts (PostgreSQL / MySQL).

The modules, each one job, lower ones first:

    identity   who a worker is (host + pid; $TTSWEEP_HOST overrides the host) and whether it lives
    locks      flocks of this machine; the database server's advisory locks for shared storage
    storage    the table of storage kinds, opening one (drivers, first-time schema), load_study
    recovery   fail and re-queue the trials of dead workers (pid, heartbeats, Optuna heartbeats)
    trials     reading a study: records, counts (FAIL vs REQUEUED), status
    queue      the trial queue: guard / claim / recover / beat, one class per kind of storage
    prepare    create the study, recover, queue a grid's configs once; samplers
    worker     claim and evaluate trials until none are left (`sweep worker`, spawned workers)
    runner     `sweep run`: N local workers, respawns, progress, summary, GPUs per worker

SQLite's claim is not atomic, so it is refused for several workers. Study user attributes: model,
devices, objectives, spec (the parsed study file, storage password removed), perf_calibration, and
for grids grid_size, grid_planned, skipped_equivalent and skipped_configs ([{config, same_as}]).
"""
from __future__ import annotations

from sweep.study import identity, locks, storage  # noqa: F401 - load order: lower layers first
from sweep.study.identity import worker_identity
from sweep.study.locks import clear_stale_journal_lock, no_live_workers, study_lock, worker_presence
from sweep.study.prepare import Prepared, enqueue_config, make_sampler, plan_grid, prepare
from sweep.study.queue import LocalQueue, SharedQueue, TrialQueue, open_queue
from sweep.study.recovery import MAX_DEATHS, fail_and_requeue, recover_stale, requeue_params
from sweep.study.runner import RunSummary, device_plan, run, worker_threads
from sweep.study.storage import BACKENDS, StudyNotFound, backend, load_study, open_storage, storage_exists
from sweep.study.trials import STATES, Tally, records, status, superseded_numbers
from sweep.study.worker import FATAL_EXIT, Worker, serve, worker_main

__all__ = [
    "BACKENDS", "FATAL_EXIT", "LocalQueue", "MAX_DEATHS", "Prepared", "RunSummary", "STATES", "SharedQueue",
    "StudyNotFound", "Tally", "TrialQueue", "Worker", "backend", "clear_stale_journal_lock", "device_plan", "enqueue_config",
    "fail_and_requeue", "load_study", "make_sampler", "no_live_workers", "open_queue", "open_storage", "plan_grid",
    "prepare", "records", "recover_stale", "requeue_params", "run", "serve", "status", "storage_exists",
    "study_lock", "superseded_numbers", "worker_identity", "worker_main", "worker_presence", "worker_threads",
]
