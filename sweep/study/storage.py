"""Storages of a study: the backends we support (one table), opening one, loading the study.

`BACKENDS` is the one table of storage kinds: whether several workers may claim trials from it
(SQLite's claim is not atomic), whether it is shared by several hosts (then enqueue, recovery and
the sampler budget are guarded by the database server's advisory lock, and trials carry Optuna
heartbeats), the lock's SQL, and the pip extra with its driver.

Opening a shared database for the first time creates Optuna's tables; several hosts doing that at
once race (`CREATE TYPE studydirection` fails on all but one), so schema creation is serialised
under the database lock `ttsweep:schema`.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from sweep.metric_names import set_metric_names
from sweep.space import StudySpec, canonical_storage_url
from sweep.study import locks
from sweep.study.locks import journal_folder

JOURNAL_LOCK_GRACE_S = 10  # seconds before a journal lock left by a killed process is broken

optuna.logging.set_verbosity(optuna.logging.WARNING)


def heartbeat_s() -> float:
    """Seconds between a worker's heartbeats (SWEEP_HEARTBEAT_S; default 15)."""
    return float(os.environ.get("SWEEP_HEARTBEAT_S", "15"))


def stale_s() -> float:
    """Seconds without a heartbeat after which a RUNNING trial's worker counts as dead
    (SWEEP_STALE_S; default max(120, 8 heartbeats)): Optuna's `grace_period` on shared storage."""
    return float(os.environ.get("SWEEP_STALE_S", str(max(120.0, 8 * heartbeat_s()))))


def _pg_lock_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _mysql_lock_id(name: str) -> str:
    return "ttsweep-" + hashlib.blake2b(name.encode(), digest_size=20).hexdigest()  # <= 64 chars


@dataclass(frozen=True)
class Backend:
    name: str
    atomic_claim: bool  # WAITING -> RUNNING is atomic: several workers may claim trials
    shared: bool  # several hosts: database lock + Optuna heartbeats
    extra: str | None = None  # `pip install 'ttsweep[extra]'` installs its driver
    lock_sql: str = ""  # session-level advisory lock, bind parameter :lock
    unlock_sql: str = ""
    lock_id: Callable[[str], Any] | None = None


BACKENDS = {
    "journal": Backend("journal", atomic_claim=True, shared=False),
    "sqlite": Backend("sqlite", atomic_claim=False, shared=False),
    "postgresql": Backend("postgresql", True, True, "postgres", "SELECT pg_advisory_lock(:lock)",
                          "SELECT pg_advisory_unlock(:lock)", _pg_lock_id),
    "mysql": Backend("mysql", True, True, "mysql", "SELECT GET_LOCK(:lock, 86400)", "SELECT RELEASE_LOCK(:lock)",
                     _mysql_lock_id),
}
BACKENDS["mariadb"] = BACKENDS["mysql"]
BACKENDS["postgres"] = BACKENDS["postgresql"]


class StudyNotFound(FileNotFoundError):
    """The study has never been run (no storage or no study of that name)."""


def redact(url: str) -> str:
    """A storage URL with its password replaced by ***, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@/]*@", r"\1***@", url)


def backend(url: str) -> Backend:
    """The storage kind of a study-file storage string; ValueError for an unsupported one."""
    scheme = "journal" if url.startswith("journal:") else url.split("://", 1)[0].split("+", 1)[0].lower()
    try:
        return BACKENDS[scheme]
    except KeyError:
        raise ValueError(f"storage {redact(url)}: {scheme!r} databases are not supported for sweeps; use "
                         "journal:PATH (one machine), postgresql://... or mysql://... (several hosts), or sqlite:///PATH"
                         ) from None


def storage_exists(spec: StudySpec) -> bool:
    jp = spec.journal_path
    if jp is not None:
        return jp.is_file() and jp.stat().st_size > 0
    if spec.storage.startswith("sqlite:///"):
        return Path(spec.storage[len("sqlite:///"):]).is_file()
    return True


def lock(url: str, name: str):
    """The database lock `name` of a shared storage (context manager)."""
    url = canonical_storage_url(url)
    b = backend(url)
    return locks.db_lock(url, name, b.lock_sql, b.unlock_sql, b.lock_id)


def open_storage(url: str, create: bool = True, stale_callback=None):
    """An Optuna storage for a study-file storage string (`journal:PATH` or a database URL).

    On a shared database `stale_callback` turns on Optuna's heartbeats (`heartbeat_interval`,
    `grace_period`) with that callback for trials whose worker stopped beating."""
    url = canonical_storage_url(url)
    b = backend(url)
    if b.name == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        path = Path(url[len("journal:"):])
        if not create and not path.is_file():
            raise StudyNotFound(f"no journal file {path}: the study has not been run yet")
        journal_folder(path.parent)
        # A worker SIGKILLed while appending leaves the lock file behind; Optuna breaks such a lock
        # after `grace_period` s of waiting. Appends hold it for milliseconds, so 10 s (not the
        # default 30) is still far above any real hold and shortens the stall on resume.
        lock_obj = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock_obj))
    if b.name == "sqlite" and not create and not Path(url[len("sqlite:///"):]).is_file():
        raise StudyNotFound(f"no database {url}: the study has not been run yet")
    kw: dict[str, Any] = {}
    if b.shared and stale_callback is not None:
        hb = max(1, round(heartbeat_s()))
        kw = dict(heartbeat_interval=hb, grace_period=max(hb + 1, round(stale_s())),
                  heartbeat_stale_trial_callback=stale_callback)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if not b.shared:
                return optuna.storages.RDBStorage(url, **kw)
            with lock(url, "ttsweep:schema"):  # first-time table creation races across hosts
                return optuna.storages.RDBStorage(url, **kw)
    except ImportError as exc:
        raise ValueError(missing_driver(url, b, exc)) from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy.exc.OperationalError & co: server down, bad login
        if type(exc).__name__ == "NoSuchModuleError":  # an unknown dialect or driver: postgresql+nosuch://
            raise ValueError(f"storage {redact(url)}: SQLAlchemy has no such database driver ({exc}); write "
                             "postgresql://..., postgresql+psycopg://... or mysql+pymysql://...") from None
        if type(exc).__module__.startswith("sqlalchemy") and "OperationalError" in type(exc).__name__:
            orig = str(getattr(exc, "orig", None) or exc).strip()
            why = orig.splitlines()[0] if orig else type(exc).__name__
            raise ValueError(f"storage {redact(url)}: cannot connect to the database ({why}); "
                             "check the host, port, user and password, and that the server runs") from None
        raise


def missing_driver(url: str, b: Backend, exc: ImportError) -> str:
    """One line: which driver is missing for `url` and the extra that installs it."""
    hint = f"pip install 'ttsweep[{b.extra}]'" if b.extra else f"install the {exc.name} package"
    if b.name == "mysql" and "+pymysql" not in url:
        hint += " and write the URL as mysql+pymysql://..."
    return f"storage {redact(url)}: its database driver is not installed (no module {exc.name!r}); {hint}"


def _study_exists(storage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def load_study(spec: StudySpec, create: bool = False, sampler=None, storage=None) -> optuna.Study:
    """The spec's Optuna study. `create=False` (readers: reports, status) raises StudyNotFound
    when it has never been run and never writes; `create=True` creates it with the study-level
    user attributes, or checks that an existing one was made from the same study file (call it
    under the study's guard, `sweep.study.queue`). `storage`: an already opened storage."""
    if not create and not storage_exists(spec):
        raise StudyNotFound(f"study {spec.name!r} has not been run yet (no storage at {redact(spec.storage)})")
    storage = storage if storage is not None else open_storage(spec.storage, create=create)
    if not create:
        if not _study_exists(storage, spec.name):
            raise StudyNotFound(f"study {spec.name!r} is not in {redact(spec.storage)}; run `sweep run` first")
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions,
                                sampler=sampler, load_if_exists=True)
    set_metric_names(study, spec.objectives)  # optuna-dashboard shows top1 / top5 / speed:D / ttft:D
    attrs = study.user_attrs
    if "spec" not in attrs:
        study.set_user_attr("model", spec.model)
        study.set_user_attr("devices", list(spec.devices))
        study.set_user_attr("objectives", list(spec.objectives))
        study.set_user_attr("perf_calibration", _calibration_note())
        stored = spec.to_dict()
        stored["storage"] = redact(stored["storage"])  # no password in the study
        study.set_user_attr("spec", stored)  # last: its presence marks a complete setup
    else:
        _check_same_spec(spec, attrs["spec"])
    return study


def _check_same_spec(spec: StudySpec, stored: dict) -> None:
    new = spec.comparable()
    old = {k: v for k, v in stored.items() if k in new}
    if old != new:
        diff = sorted(k for k in new if old.get(k) != new.get(k))
        raise ValueError(
            f"study {spec.name!r} in {redact(spec.storage)} was created from a different study file "
            f"({', '.join(diff)} differ); give the study a new name or storage, or delete the old one"
        )


def _calibration_note() -> str:
    try:
        from engine.perf import model as perf

        return str(perf.calibration_note())
    except Exception as exc:  # noqa: BLE001 - the note is informative only
        return f"(no calibration note: {type(exc).__name__}: {exc})"
