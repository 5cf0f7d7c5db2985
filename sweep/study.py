"""Run a study: worker processes on one Optuna storage, exact-once grids, samplers, resume.

Grids: `prepare` enqueues every config of the space once (after dropping configs dominated a
priori, `sweep.equivalence`) as a WAITING trial with fixed params, under a file lock, skipping
configs already present in any state; workers claim WAITING trials one at a time through the
storage's atomic WAITING -> RUNNING transition (JournalFileBackend on one machine, PostgreSQL /
MySQL across machines; SQLite is not atomic and is refused with several workers). Optuna's
GridSampler is not used: with parallel workers it re-runs configs.

Other samplers (nsga2, tpe, gp): each worker asks Optuna's sampler for a new trial while the
budget (`n_trials`, counting every trial that is not superseded) has room, under the same file
lock. TPE runs with constant liar, GP accounts for running trials itself and NSGA-II samples from
the finished population, so parallel workers do not all propose the same point. Each worker's
sampler is seeded from the study seed, the worker index and the number of trials already in the
study (samplers are not stored with a study).

Per trial a worker evaluates accuracy once (engine.accuracy.Evaluator, one per worker process,
built on first use) unless a COMPLETE trial with the same numerics key exists (then it reuses
that trial's accuracy: `reused_from`), predicts speed and TTFT for every device of the study
(engine.perf.predict), and stores a `sweep.records.TrialRecord` as user attributes, plus:

    numerics_key   digest of sweep.equivalence.numerics_key (equal = provably same numerics)
    worker         {"host", "pid", "start", "boot"}: who runs / ran the trial
    heartbeat      unix time, refreshed every HEARTBEAT_S while the trial runs
    trial_s        the whole trial's wall time (accuracy + perf + storage)
    fail_reason    FAIL trials: one line (exception type and message)
    superseded     FAIL trials whose config was queued again (killed worker, Ctrl-C)
    requeued_from  the trial number a re-queued trial replaces
    duplicate_of   PRUNED trials: a grid config that was already COMPLETE

A trial whose evaluation raises (NonFiniteLogits, MemoryError, anything) is told FAIL with its
reason and the study goes on. Ctrl-C: each worker fails its running trial with reason
"interrupted", queues its params again and exits; finished trials are never lost (each is told
as soon as it ends). A worker that dies (SIGKILL, OOM killer) leaves a RUNNING trial: the parent
notices the dead worker, and every `sweep run` starts by recovering stale RUNNING trials (worker
process gone on this host, or no heartbeat for STALE_S): they are failed (superseded) and their
params queued again, so running the same command again resumes the study. The params queued
again are the trial's whole fixed params (a worker killed inside `space.suggest` leaves only some
on the trial); a sampled trial killed before its params were all chosen is not re-queued, the
sampler proposes a new one. Every worker holds a shared flock on `<name>.workers.lock` while it
lives; when none does (journal storage), a RUNNING trial that names no worker (killed between
claiming it and writing its identity) is recovered at once, not after NO_WORKER_GRACE_S, and a
journal lock file left by a process killed while appending is removed (Optuna would break it only
after JOURNAL_LOCK_GRACE_S of waiting).

Study user attributes: model, devices, objectives, spec (the parsed study file), perf_calibration,
and for grids grid_size (configs in the space), grid_planned (configs queued to run),
skipped_equivalent (configs skipped as dominated a priori) and skipped_configs
([{config, same_as}]).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from engine.config import ModelConfig
from sweep.equivalence import numerics_digest, representatives
from sweep.records import TrialRecord, accuracy_attrs
from sweep.space import StudySpec

HEARTBEAT_S = float(os.environ.get("SWEEP_HEARTBEAT_S", "15"))
STALE_S = float(os.environ.get("SWEEP_STALE_S", str(max(120.0, 8 * HEARTBEAT_S))))
NO_WORKER_GRACE_S = 60.0  # a RUNNING trial with no worker attribute this old is stale
MAX_DEATHS = 3  # a config whose worker died this many times is failed for good
JOURNAL_LOCK_GRACE_S = 10  # seconds before a journal lock left by a killed process is broken
FATAL_EXIT = 3  # worker exit status: cannot work at all (model cannot load, ...)
STATES = ("COMPLETE", "FAIL", "RUNNING", "WAITING")

optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyNotFound(FileNotFoundError):
    """The study has never been run (no storage or no study of that name)."""


# --- storage and study --------------------------------------------------------------------------
def storage_exists(spec: StudySpec) -> bool:
    jp = spec.journal_path
    if jp is not None:
        return jp.is_file() and jp.stat().st_size > 0
    if spec.storage.startswith("sqlite:///"):
        return Path(spec.storage[len("sqlite:///"):]).is_file()
    return True


def open_storage(url: str, create: bool = True):
    """An Optuna storage for a study-file storage string (`journal:PATH` or any storage URL)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        path = Path(url[len("journal:"):])
        if not create and not path.is_file():
            raise StudyNotFound(f"no journal file {path}: the study has not been run yet")
        path.parent.mkdir(parents=True, exist_ok=True)
        # A worker SIGKILLed while appending leaves the lock file behind; Optuna breaks such a lock
        # after `grace_period` s of waiting. Appends hold it for milliseconds, so 10 s (not the
        # default 30) is still far above any real hold and shortens the stall on resume.
        lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    if url.startswith("sqlite:///") and not create and not Path(url[len("sqlite:///"):]).is_file():
        raise StudyNotFound(f"no database {url}: the study has not been run yet")
    return optuna.storages.RDBStorage(url)


def _study_exists(storage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def load_study(spec: StudySpec, create: bool = False, sampler=None) -> optuna.Study:
    """The spec's Optuna study. `create=False` (readers: reports, status) raises StudyNotFound
    when it has never been run and never writes; `create=True` creates it with the study-level
    user attributes, or checks that an existing one was made from the same study file."""
    if not create and not storage_exists(spec):
        raise StudyNotFound(f"study {spec.name!r} has not been run yet (no storage at {spec.storage})")
    storage = open_storage(spec.storage, create=create)
    if not create:
        if not _study_exists(storage, spec.name):
            raise StudyNotFound(f"study {spec.name!r} is not in {spec.storage}; run `sweep run` first")
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions,
                                sampler=sampler, load_if_exists=True)
    attrs = study.user_attrs
    if "spec" not in attrs:
        study.set_user_attr("model", spec.model)
        study.set_user_attr("devices", list(spec.devices))
        study.set_user_attr("objectives", list(spec.objectives))
        study.set_user_attr("perf_calibration", _calibration_note())
        study.set_user_attr("spec", spec.to_dict())  # last: its presence marks a complete setup
    else:
        _check_same_spec(spec, attrs["spec"])
    return study


def _check_same_spec(spec: StudySpec, stored: dict) -> None:
    new = spec.comparable()
    old = {k: v for k, v in stored.items() if k in new}
    if old != new:
        diff = sorted(k for k in new if old.get(k) != new.get(k))
        raise ValueError(
            f"study {spec.name!r} in {spec.storage} was created from a different study file "
            f"({', '.join(diff)} differ); give the study a new name or storage, or delete the old one"
        )


def _calibration_note() -> str:
    try:
        from engine import perf

        return str(perf.calibration_note())
    except Exception as exc:  # noqa: BLE001 - the note is informative only
        return f"(no calibration note: {type(exc).__name__}: {exc})"


def _lock_path(spec: StudySpec, what: str) -> Path:
    """`<runs dir>/<study>.<what>.lock`, the file behind this study's flocks on this machine."""
    spec.runs_dir.mkdir(parents=True, exist_ok=True)
    return spec.runs_dir / f"{spec.name}.{what}.lock"


@contextlib.contextmanager
def study_lock(spec: StudySpec, what: str = "sweep") -> Iterator[None]:
    """An exclusive lock for this study on this machine: `sweep` (enqueue, recovery, sampler
    budget) or `evaluator` (one worker at a time builds its evaluator, so the fp32 reference is
    computed once and cached, not by every worker at the same time)."""
    with open(_lock_path(spec, what), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def worker_presence(spec: StudySpec) -> Iterator[None]:
    """Held (shared) by every worker for its lifetime; the kernel drops it when the process dies,
    even by SIGKILL, so `no_live_workers` can tell that nobody on this machine works the study."""
    with open(_lock_path(spec, "workers"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        yield


def no_live_workers(spec: StudySpec) -> bool:
    """True when no worker process of this study is alive on this machine."""
    with open(_lock_path(spec, "workers"), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def _nobody_since(spec: StudySpec | None, now: float) -> float | None:
    """`now` when no worker of a journal-file study is alive (all its workers run on this
    machine, so none can be anywhere else), else None: the `nobody_since` of `_is_stale`."""
    if spec is None or spec.journal_path is None or not no_live_workers(spec):
        return None
    return now


def clear_stale_journal_lock(spec: StudySpec) -> bool:
    """Remove the journal's lock file when no worker of the study is alive; call under `study_lock`.

    Only workers and `sweep run` parents (under `study_lock`) append to a journal, so with the study
    lock held and no worker alive, an existing lock file was left by a process killed while
    appending. Optuna would break it only after JOURNAL_LOCK_GRACE_S of waiting."""
    jp = spec.journal_path
    if jp is None:
        return False
    lock = Path(str(jp) + ".lock")  # optuna.storages.journal's LOCK_FILE_SUFFIX
    if not os.path.lexists(lock) or not no_live_workers(spec):
        return False
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return True


# --- reading a study ------------------------------------------------------------------------------
def records(study: optuna.Study) -> list[tuple[int, TrialRecord]]:
    """(trial number, TrialRecord) of every COMPLETE trial, in trial-number order."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "config" in t.user_attrs and "top1" in t.user_attrs:
            out.append((t.number, TrialRecord.from_user_attrs(t.user_attrs)))
    return sorted(out, key=lambda x: x[0])


def superseded_numbers(trials: list[FrozenTrial]) -> set[int]:
    """FAIL trials whose config was queued again: marked `superseded` when failed by the runner,
    or named by a later trial's `requeued_from` (`--retry-failed`)."""
    out = {t.number for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("superseded")}
    out |= {int(t.user_attrs["requeued_from"]) for t in trials if "requeued_from" in t.user_attrs}
    return out


@dataclass
class Tally:
    counts: dict[str, int]
    superseded: int  # FAIL trials replaced by a re-queued trial (not counted in done)
    done: int  # COMPLETE + FAIL (not superseded)
    slots: int  # trials that count against a sampler budget

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> "Tally":
        counts = {s: 0 for s in STATES}
        sups = superseded_numbers(trials)
        sup = 0
        for t in trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
            sup += t.state == TrialState.FAIL and t.number in sups
        done = counts["COMPLETE"] + counts["FAIL"] - sup
        pruned = counts.get("PRUNED", 0)
        return cls(counts, sup, done, len(trials) - sup - pruned)


def status(spec: StudySpec) -> dict:
    """Counts by state plus failures and running trials; never writes to the storage."""
    try:
        study = load_study(spec, create=False)
    except StudyNotFound as exc:
        return {"counts": {s: 0 for s in STATES}, "failures": [], "running": [], "note": str(exc),
                "total": None, "skipped": None}
    trials = study.get_trials(deepcopy=False)
    tally = Tally.of(trials)
    sups = superseded_numbers(trials)
    failures, running = [], []
    nobody = _nobody_since(spec, time.time())
    for t in trials:
        if t.state == TrialState.FAIL:
            failures.append({"number": t.number, "config": t.user_attrs.get("config", ""),
                             "reason": t.user_attrs.get("fail_reason", "(no reason recorded)"),
                             "superseded": t.number in sups})
        elif t.state == TrialState.RUNNING:
            w = t.user_attrs.get("worker") or {}
            running.append({"number": t.number, "config": t.user_attrs.get("config", ""),
                            "worker": w, "alive": not _is_stale(t, nobody_since=nobody)})
    attrs = study.user_attrs
    total = attrs.get("grid_planned") if spec.is_grid else spec.sampler.n_trials
    return {"counts": tally.counts, "failures": failures, "running": running, "total": total,
            "done": tally.done, "skipped": attrs.get("skipped_equivalent"), "note": ""}


# --- liveness of workers --------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """Start time of a process (ticks since boot) and whether it is a zombie, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19]


def worker_identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid), "boot": _boot_id()}


def _pid_alive(w: dict) -> bool:
    pid = int(w.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _proc_start(pid)
    if start == "zombie":
        return False
    return not (w.get("start") and start and start != w["start"])


def _is_stale(t: FrozenTrial, now: float | None = None, nobody_since: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone. `nobody_since`: a time at which no worker of the
    study was alive on this machine (journal storage: every worker is on this machine)."""
    now = time.time() if now is None else now
    w = t.user_attrs.get("worker")
    if not w:  # claimed, but its worker has not written who it is (yet, or ever: killed in between)
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if nobody_since is not None and started <= nobody_since:
            return True
        return now - started > NO_WORKER_GRACE_S
    if w.get("host") == socket.gethostname() and w.get("boot", "") == _boot_id():
        if not _pid_alive(w):
            return True
    hb = float(t.user_attrs.get("heartbeat", 0) or 0)
    return bool(hb) and now - hb > STALE_S


def _trial_id(study: optuna.Study, number: int) -> int:
    storage = study._storage  # noqa: SLF001 - Study exposes no public storage accessor
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def requeue_params(t: FrozenTrial) -> dict | None:
    """The whole param assignment that queues `t`'s config again, or None when it is unknown.

    A worker killed halfway through `space.suggest` leaves only some params on the trial. An
    enqueued trial still has all of them in its fixed params; a sampled trial has them all only
    once its config was recorded (after suggest). Re-queuing a partial assignment would let the
    sampler fill the gaps at random: a different config under the old trial's name.
    """
    fixed = t.system_attrs.get("fixed_params") or {}
    if fixed:
        return {**t.params, **fixed}
    if t.params and "config" in t.user_attrs:
        return dict(t.params)
    return None


def fail_and_requeue(study: optuna.Study, t: FrozenTrial, reason: str, death: bool) -> bool:
    """Fail a RUNNING trial with `reason` and queue its params again (unless its worker died
    MAX_DEATHS times on it). Returns whether it was re-queued. Safe against a concurrent recovery:
    only the process whose token ends up on the trial re-queues it."""
    storage = study._storage  # noqa: SLF001
    tid = _trial_id(study, t.number)
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
        attrs = {"requeued_from": t.number, "deaths": deaths}
        if "config" in t.user_attrs:
            attrs["config"] = t.user_attrs["config"]
        study.enqueue_trial(params, user_attrs=attrs)
    return requeue


def recover_stale(study: optuna.Study, spec: StudySpec | None = None) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker is gone; returns their numbers. With the
    `spec` of a journal-file study, a trial claimed by a worker killed before it wrote its
    identity is recovered at once when no worker is alive (instead of after NO_WORKER_GRACE_S)."""
    out = []
    now = time.time()
    nobody = _nobody_since(spec, now)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(t, now, nobody):
            w = t.user_attrs.get("worker") or {}
            who = f"pid {w.get('pid')} on {w.get('host')}" if w else "unknown worker"
            fail_and_requeue(study, t, f"worker died ({who}) while running the trial", death=True)
            out.append(t.number)
    return out


# --- preparing a run ------------------------------------------------------------------------------
@dataclass
class Prepared:
    study: optuna.Study
    total: int  # trials the run aims at (grid: configs planned; samplers: n_trials)
    size: int  # configs in the space
    skipped: int  # grid configs skipped as dominated a priori
    enqueued: int  # grid configs queued by this call
    recovered: list[int] = field(default_factory=list)
    requeued_failed: int = 0


def perf_cost(spec: StudySpec) -> Callable[[Any], list[float] | None]:
    """Cost vector (per device: -speed, ttft) from engine.perf, None when it cannot price a config."""
    try:
        from engine import perf
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


def prepare(spec: StudySpec, retry_failed: bool = False) -> Prepared:
    """Create or load the study, recover stale trials and (grids) queue the missing configs.

    Everything happens under the study lock, so concurrent `sweep run`s never queue a config twice.
    """
    with study_lock(spec):
        clear_stale_journal_lock(spec)
        study = load_study(spec, create=True)
        recovered = recover_stale(study, spec)
        enq = 0
        skipped_n = 0
        requeued_failed = 0
        if spec.is_grid:
            kept, skipped = plan_grid(spec)
            skipped_n = len(skipped)
            attrs = study.user_attrs
            if attrs.get("grid_planned") != len(kept):
                study.set_user_attr("grid_size", spec.space.size)
                study.set_user_attr("grid_planned", len(kept))
                study.set_user_attr("skipped_equivalent", skipped_n)
                study.set_user_attr("skipped_configs", [{"config": str(a), "same_as": str(b)} for a, b in skipped])
            trials = study.get_trials(deepcopy=False)
            sups = superseded_numbers(trials)
            present = {t.user_attrs.get("config") for t in trials
                       if t.number not in sups and t.state != TrialState.PRUNED}
            retry: dict[str, int] = {}
            if retry_failed:
                complete = {t.user_attrs.get("config") for t in trials if t.state == TrialState.COMPLETE}
                for t in trials:
                    c = t.user_attrs.get("config")
                    if t.state == TrialState.FAIL and t.number not in sups and c not in complete:
                        retry[c] = t.number
                        present.discard(c)
            for params, mc in kept:
                c = str(mc)
                if c not in present:
                    attrs: dict[str, Any] = {"config": c}
                    if c in retry:
                        attrs["requeued_from"] = retry[c]
                        requeued_failed += 1
                    study.enqueue_trial(params, user_attrs=attrs)
                    present.add(c)
                    enq += 1
            total = len(kept)
        else:
            if retry_failed:
                trials = study.get_trials(deepcopy=False)
                sups = superseded_numbers(trials)
                for t in trials:
                    params = requeue_params(t) if t.state == TrialState.FAIL and t.number not in sups else None
                    if params is not None:
                        attrs = {"requeued_from": t.number}
                        if "config" in t.user_attrs:
                            attrs["config"] = t.user_attrs["config"]
                        study.enqueue_trial(params, user_attrs=attrs)
                        requeued_failed += 1
            total = int(spec.sampler.n_trials or 0)
    return Prepared(study, total, spec.space.size, skipped_n, enq, recovered, requeued_failed)


# --- samplers ---------------------------------------------------------------------------------------
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


# --- the worker ---------------------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


class Worker:
    """One worker: claims trials of a study and evaluates them until none are left."""

    def __init__(self, study: optuna.Study, spec: StudySpec, index: int = 0):
        self.study = study
        self.spec = spec
        self.index = index
        self.evaluator = None
        self.stop = False
        self.in_eval = False
        self.current: optuna.Trial | None = None
        self.host = _host_info()
        self._hb_stop = threading.Event()
        self._hb = None

    # --- claiming --------------------------------------------------------------------------
    def _pop_waiting(self) -> optuna.Trial | None:
        storage = self.study._storage  # noqa: SLF001
        sid = storage.get_study_id_from_name(self.study.study_name)
        for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,)):
            tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
            try:
                if storage.set_trial_state_values(tid, TrialState.RUNNING):
                    return optuna.Trial(self.study, tid)
            except UpdateFinishedTrialError:
                continue
        return None

    def claim(self) -> optuna.Trial | None:
        if self.spec.is_grid:
            return self._pop_waiting()
        with study_lock(self.spec):
            trial = self._pop_waiting()
            if trial is not None:
                return trial
            tally = Tally.of(self.study.get_trials(deepcopy=False))
            if tally.slots >= int(self.spec.sampler.n_trials or 0):
                return None
            return self.study.ask()

    # --- heartbeat ---------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._hb_stop.wait(HEARTBEAT_S):
            t = self.current
            if t is None:
                continue
            try:
                self.study._storage.set_trial_user_attr(t._trial_id, "heartbeat", time.time())  # noqa: SLF001
            except Exception:  # noqa: BLE001 - the trial just finished, or a transient storage error
                pass

    # --- one trial ---------------------------------------------------------------------------
    def _evaluator(self):
        if self.evaluator is None:
            from engine.accuracy import Evaluator

            with study_lock(self.spec, "evaluator"):
                self.evaluator = Evaluator(self.spec.model, **self.spec.eval)  # prefill, decode, windows
        return self.evaluator

    def _find_equal(self, digest: str, number: int) -> FrozenTrial | None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number != number and t.user_attrs.get("numerics_key") == digest and "top1" in t.user_attrs:
                return t
        return None

    def process(self, trial: optuna.Trial) -> str:
        """Evaluate one claimed trial; returns its final state name."""
        t_start = time.time()
        self.current = trial
        params = None
        try:
            trial.set_user_attr("worker", worker_identity())
            trial.set_user_attr("heartbeat", time.time())
            fixed = self.study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")  # noqa: SLF001
            missing = [p.name for p in self.spec.space.params if fixed and p.name not in fixed]
            if missing:  # the sampler would fill them at random: another config than the one queued
                raise ValueError(f"trial was queued without params {', '.join(missing)}; "
                                 "re-run `sweep run --retry-failed` to queue its config again")
            params = self.spec.space.suggest(trial)
            mc = self.spec.space.config(params)
            cfg = str(mc)
            digest = numerics_digest(mc)
            trial.set_user_attr("config", cfg)
            trial.set_user_attr("numerics_key", digest)
            if self.spec.is_grid:
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                    if t.user_attrs.get("config") == cfg and t.number != trial.number:
                        trial.set_user_attr("duplicate_of", t.number)
                        self.study.tell(trial, state=TrialState.PRUNED)
                        return "PRUNED"
            rec = self._record(trial, mc, cfg, digest)
            for k, v in rec.to_user_attrs().items():
                trial.set_user_attr(k, v)
            trial.set_user_attr("trial_s", round(time.time() - t_start, 3))
            for c in self.spec.constraints:
                trial.set_constraint(c.key, c.violation(rec.objective(c.metric)))
            values = [rec.objective(o) for o in self.spec.objectives]
            bad = [o for o, v in zip(self.spec.objectives, values) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"objective {bad[0]} is not finite ({values[self.spec.objectives.index(bad[0])]})")
            self.study.tell(trial, values)
            return "COMPLETE"
        except (KeyboardInterrupt, _Interrupted):
            self.in_eval = False
            self.stop = True
            ft = self.study._storage.get_trial(trial._trial_id)  # noqa: SLF001
            if not ft.state.is_finished():
                fail_and_requeue(self.study, ft, "interrupted (Ctrl-C or SIGTERM) during the trial; re-queued", death=False)
            return "INTERRUPTED"
        except _FatalWorkerError:
            ft = self.study._storage.get_trial(trial._trial_id)  # noqa: SLF001
            if not ft.state.is_finished():
                fail_and_requeue(self.study, ft, "worker could not start its evaluator; re-queued", death=False)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one trial fails that trial only
            reason = _one_line(exc)
            try:
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr("trial_s", round(time.time() - t_start, 3))
                self.study.tell(trial, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                pass
            return "FAIL"
        finally:
            self.in_eval = False
            self.current = None

    def _record(self, trial: optuna.Trial, mc: ModelConfig, cfg: str, digest: str) -> TrialRecord:
        src = self._find_equal(digest, trial.number)
        if src is not None:
            a = src.user_attrs
            acc = accuracy_attrs(a)  # with its per-token record: the numerics are equal
            reused_from = a.get("reused_from") or a["config"]
            wall = 0.0
        else:
            try:
                ev = self._evaluator()
            except Exception as exc:  # noqa: BLE001
                raise _FatalWorkerError(_one_line(exc)) from exc
            t0 = time.perf_counter()
            self.in_eval = True  # from here SIGINT / SIGTERM interrupt the evaluation
            if self.stop:
                raise _Interrupted()
            _test_hook(cfg)
            res = ev.evaluate(mc)
            self.in_eval = False
            wall = time.perf_counter() - t0
            acc = accuracy_attrs(res)
            reused_from = None
        from engine import perf

        speed, ttft = {}, {}
        for d in self.spec.devices:
            r = perf.predict(self.spec.model, d, mc, **self.spec.perf)
            speed[d], ttft[d] = float(r.speed_tsu), float(r.ttft_ms)
        try:
            dj = mc.to_decoder_json()
        except Exception:  # noqa: BLE001 - e.g. hifi3 / fp32 have no tt-metal equivalent
            dj = None
        return TrialRecord(config=cfg, model=self.spec.model, speed=speed, ttft=ttft, wall_s=round(wall, 4),
                           host=self.host, reused_from=reused_from, decoder_json=dj, **acc)

    # --- the loop ------------------------------------------------------------------------------
    def run(self, max_trials: int | None = None) -> dict[str, int]:
        done: dict[str, int] = {}
        self._hb = threading.Thread(target=self._heartbeat, daemon=True)
        self._hb.start()
        try:
            with worker_presence(self.spec):
                n = 0
                while not self.stop and (max_trials is None or n < max_trials):
                    trial = self.claim()
                    if trial is None:
                        break
                    state = self.process(trial)
                    done[state] = done.get(state, 0) + 1
                    n += 1
        finally:
            self._hb_stop.set()
        return done


class _FatalWorkerError(RuntimeError):
    pass


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _host_info() -> str:
    try:
        import torch

        tv = torch.__version__
    except Exception:  # noqa: BLE001
        tv = "?"
    return (f"{socket.gethostname()} ({platform.system()} {platform.machine()}, {os.cpu_count()} cpus, "
            f"python {platform.python_version()}, torch {tv}, optuna {optuna.__version__})")


def _test_hook(cfg: str) -> None:
    """Test hooks (environment variables read by workers; used by tests/test_study.py only):

    SWEEP_TEST_HANG=PATH   the first trial to evaluate (whoever creates PATH) writes its pid
                           there and sleeps, so a test can SIGKILL a worker mid-trial;
    SWEEP_TEST_FAIL=TEXT   trials whose config string contains TEXT raise NonFiniteLogits.
    """
    hang = os.environ.get("SWEEP_TEST_HANG")
    if hang:
        try:
            fd = os.open(hang, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            fd = None
        if fd is not None:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            while True:
                time.sleep(0.2)
    fail = os.environ.get("SWEEP_TEST_FAIL")
    if fail and fail in cfg:
        try:
            from engine.accuracy import NonFiniteLogits
        except ImportError:  # pragma: no cover
            NonFiniteLogits = RuntimeError  # noqa: N806
        raise NonFiniteLogits("non-finite logits at decode position 3 (test hook SWEEP_TEST_FAIL)")


def worker_main(storage_url: str, study_name: str, index: int, threads: int | None = None) -> int:
    """Entry point of a worker process (`python -m sweep.study worker ...`); `threads`: torch
    intra-op threads (the parent gives each of N workers cpu_count / N)."""
    state = {"worker": None}
    if threads:
        import torch

        torch.set_num_threads(threads)

    def on_signal(signum, frame):  # noqa: ARG001
        w = state["worker"]
        if w is None:
            raise KeyboardInterrupt
        if w.stop and not w.in_eval:
            return
        w.stop = True
        if w.in_eval:
            w.in_eval = False
            raise _Interrupted()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    storage = open_storage(storage_url, create=False)
    study = optuna.load_study(study_name=study_name, storage=storage)
    spec = StudySpec.from_dict(study.user_attrs["spec"])
    n_existing = len(study.get_trials(deepcopy=False))
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(spec, index, n_existing))
    worker = Worker(study, spec, index)
    state["worker"] = worker
    try:
        worker.run()
    except _FatalWorkerError as exc:
        print(f"worker {index}: cannot evaluate: {exc}", file=sys.stderr)
        return FATAL_EXIT
    except (KeyboardInterrupt, _Interrupted):
        return 130
    return 130 if worker.stop else 0


# --- the parent: workers, progress, summary ------------------------------------------------------
@dataclass
class RunSummary:
    name: str
    total: int
    size: int
    skipped: int
    counts: dict[str, int]
    done: int
    wall_s: float
    workers: int
    interrupted: bool = False
    recovered: list[int] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the machine's cores shared out (SWEEP_WORKER_THREADS overrides)."""
    env = os.environ.get("SWEEP_WORKER_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def _spawn(spec: StudySpec, index: int, log_dir: Path, threads: int) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    log = open(log_dir / f"{spec.name}.worker{index}.log", "w")  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "sweep.study", "worker", "--storage", spec.storage, "--study", spec.name,
             "--index", str(index), "--threads", str(threads)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    finally:
        log.close()


def _best_text(trials: list[FrozenTrial], primary: str) -> str:
    best = None
    fastest = None
    for t in trials:
        a = t.user_attrs
        if t.state != TrialState.COMPLETE or "top1" not in a:
            continue
        sp = float((a.get("speed") or {}).get(primary, float("nan")))
        key_b = (a["top1"], sp)
        key_f = (sp, a["top1"])
        if best is None or key_b > best:
            best = key_b
        if fastest is None or key_f > fastest:
            fastest = key_f
    if best is None:
        return ""
    return (f"best top1 {best[0]:.1f}% @ {best[1]:.1f} t/s/u | "
            f"fastest {fastest[0]:.1f} t/s/u @ {fastest[1]:.1f}%")


def _log_tail(spec: StudySpec, index: int, n: int = 5) -> str:
    try:
        lines = (spec.runs_dir / f"{spec.name}.worker{index}.log").read_text().strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def run(spec: StudySpec, workers: int = 1, progress: bool = True, retry_failed: bool = False,
        out=None, poll_s: float = 0.5) -> RunSummary:
    """Run (or resume) a study with `workers` worker processes; returns a summary.

    Raises KeyboardInterrupt after a clean shutdown when interrupted (the summary is printed).
    """
    out = sys.stdout if out is None else out
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and spec.storage.startswith("sqlite"):
        raise ValueError("SQLite storage cannot hand out trials to several workers safely (a trial can run twice); "
                         "use a journal file (journal:PATH, one machine) or PostgreSQL/MySQL, or --workers 1")
    t0 = time.time()
    prep = prepare(spec, retry_failed=retry_failed)
    study = prep.study
    msg = f"study {spec.name}: {prep.size} configs in the space"
    if spec.is_grid:
        msg += f", {prep.skipped} skipped as equal in numerics to a faster config, {prep.total} to run"
    else:
        msg += f", {spec.sampler.kind} sampler, budget {prep.total} trials"
    if prep.recovered:
        msg += f"; recovered {len(prep.recovered)} trial(s) of dead workers ({', '.join(map(str, prep.recovered))})"
    print(msg, file=out, flush=True)

    def tally() -> tuple[Tally, list[FrozenTrial]]:
        ts = study.get_trials(deepcopy=False)
        return Tally.of(ts), ts

    tl, trials = tally()
    if spec.is_grid:
        remaining = tl.counts["WAITING"] + tl.counts["RUNNING"]
    else:
        remaining = max(prep.total - tl.done, tl.counts["WAITING"])
    errors: list[str] = []
    interrupted = False
    recovered = list(prep.recovered)
    n_workers = 0
    if remaining > 0:
        log_dir = spec.runs_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        n_workers = min(workers, remaining)
        threads = worker_threads(n_workers)
        procs: dict[int, subprocess.Popen] = {i: _spawn(spec, i, log_dir, threads) for i in range(n_workers)}
        next_index = n_workers
        respawns = 0
        fatal = False
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=prep.total, initial=min(tl.done, prep.total), desc=spec.name, unit="trial",
                       file=sys.stderr, dynamic_ncols=True)
        last_done = tl.done
        try:
            while procs:
                time.sleep(poll_s)
                died = False
                for i, p in list(procs.items()):
                    rc = p.poll()
                    if rc is None:
                        continue
                    del procs[i]
                    if rc == FATAL_EXIT:
                        fatal = True
                        errors.append(f"worker {i} stopped: {_log_tail(spec, i, 3)}")
                    elif rc not in (0, 130):
                        died = True
                        errors.append(f"worker {i} died (exit status {rc}): {_log_tail(spec, i, 3)}")
                if died:
                    with study_lock(spec):
                        clear_stale_journal_lock(spec)
                        rec = recover_stale(study, spec)
                    recovered += rec
                    tl, _ = tally()
                    more = tl.counts["WAITING"] > 0 or (not spec.is_grid and tl.slots < prep.total)
                    if more and respawns < 2 * workers and not fatal:
                        while len(procs) < n_workers:
                            procs[next_index] = _spawn(spec, next_index, log_dir, threads)
                            next_index += 1
                            respawns += 1
                if bar is not None:
                    tl, trials = tally()
                    if tl.done != last_done:
                        bar.update(min(tl.done, prep.total) - bar.n)
                        last_done = tl.done
                        bar.set_postfix_str(_best_text(trials, spec.primary), refresh=True)
                if not procs and not fatal and respawns < 2 * workers:
                    # every worker is gone: trials still RUNNING belong to dead workers (e.g. of a
                    # run killed before this one started): recover them and go on
                    with study_lock(spec):
                        clear_stale_journal_lock(spec)
                        rec = recover_stale(study, spec)
                    recovered += rec
                    if rec:
                        tl, _ = tally()
                        for _ in range(min(n_workers, tl.counts["WAITING"]) or 1):
                            procs[next_index] = _spawn(spec, next_index, log_dir, threads)
                            next_index += 1
                            respawns += 1
        except KeyboardInterrupt:
            interrupted = True
            _shutdown(procs)
        finally:
            if bar is not None:
                tl, trials = tally()
                bar.update(max(0, min(tl.done, prep.total) - bar.n))
                bar.close()
    tl, trials = tally()
    summary = RunSummary(spec.name, prep.total, prep.size, prep.skipped, tl.counts, tl.done, time.time() - t0,
                         n_workers, interrupted, recovered, errors)
    _print_summary(summary, trials, spec, out)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _shutdown(procs: dict[int, subprocess.Popen], grace_s: float = 30.0) -> None:
    """Ask workers to stop (SIGINT: each fails and re-queues its running trial), then make sure."""
    for p in procs.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    try:
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.time()))
    except KeyboardInterrupt:
        pass
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _print_summary(s: RunSummary, trials: list[FrozenTrial], spec: StudySpec, out) -> None:
    c = s.counts
    sups = superseded_numbers(trials)
    sup = sum(t.state == TrialState.FAIL and t.number in sups for t in trials)
    line = (f"study {s.name}: {c['COMPLETE']} complete, {c['FAIL'] - sup} failed"
            + (f" (+{sup} re-queued)" if sup else "")
            + f", {c['RUNNING']} running, {c['WAITING']} waiting of {s.total}")
    if spec.is_grid:
        line += f"; {s.skipped} skipped as equal in numerics"
    line += f"; wall {s.wall_s:.1f} s with {s.workers} worker(s)"
    print(line, file=out)
    best = _best_text(trials, spec.primary)
    if best:
        print(f"  {best} ({spec.primary})", file=out)
    for e in s.worker_errors:
        print(f"  {e}", file=out)
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in sups:
            print(f"  trial {t.number} FAIL: {t.user_attrs.get('fail_reason', '?')}", file=out)
    if s.interrupted or c["WAITING"] or c["RUNNING"]:
        print("  run the same command again to resume", file=out)
    out.flush()


# --- `python -m sweep.study worker ...` ---------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.study")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="one worker process (started by `sweep run`)")
    w.add_argument("--storage", required=True)
    w.add_argument("--study", required=True)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    return worker_main(args.storage, args.study, args.index, args.threads or None)


if __name__ == "__main__":
    sys.exit(_main())
