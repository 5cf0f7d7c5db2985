"""Locks of a study: flocks on this machine, session-level advisory locks in a shared database.

Flocks (`<runs dir>/<study>.<what>.lock`) serialise the processes of one machine: the `sweep`
lock guards enqueue, recovery and the sampler budget of a journal / SQLite study (every worker
of such a study is on this machine); the `evaluator` lock lets one worker at a time build its
evaluator (the fp32 reference is computed once and cached); the shared `workers` lock is held
by every live worker, so `no_live_workers` can tell when none is left.

`db_lock(url, name)` is the cross-host guard of a PostgreSQL / MySQL study: an advisory lock of
the database server (pg_advisory_lock, GET_LOCK), held on a connection of its own. The server
releases it when that connection ends, so a host that dies holding it blocks nobody. The SQL
per database is in `sweep.study.storage.BACKENDS`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from sweep.space import StudySpec


def journal_folder(path: Path) -> None:
    """Make sure the folder of a journal file (and of the study's lock files) exists. Only a
    `.runs` folder inside an existing one is created (the default storage beside a study file);
    any other missing folder is the user's typo, refused in one line before anything is written."""
    if path.is_dir():
        return
    if path.name == ".runs" and path.parent.is_dir():
        path.mkdir(exist_ok=True)
        return
    missing = path
    while not missing.parent.is_dir() and missing.parent != missing:
        missing = missing.parent
    raise ValueError(f"storage folder {path} does not exist (no directory {missing}); create it first "
                     f"(mkdir -p {path}) or fix the journal:PATH / --storage path")


def lock_path(spec: StudySpec, what: str) -> Path:
    """`<runs dir>/<study>.<what>.lock`, the file behind this study's flocks on this machine."""
    journal_folder(spec.runs_dir)
    return spec.runs_dir / f"{spec.name}.{what}.lock"


@contextlib.contextmanager
def study_lock(spec: StudySpec, what: str = "sweep") -> Iterator[None]:
    """An exclusive flock for this study on this machine (see the module docstring)."""
    with open(lock_path(spec, what), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def worker_presence(spec: StudySpec) -> Iterator[None]:
    """Held (shared) by every worker for its lifetime; the kernel drops it when the process dies,
    even by SIGKILL, so `no_live_workers` can tell that nobody on this machine works the study."""
    with open(lock_path(spec, "workers"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        yield


def no_live_workers(spec: StudySpec) -> bool:
    """True when no worker process of this study is alive on this machine."""
    with open(lock_path(spec, "workers"), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def nobody_since(spec: StudySpec | None, now: float) -> float | None:
    """`now` when no worker of a journal-file study is alive (all its workers run on this
    machine, so none can be anywhere else), else None: the `nobody_since` of `is_stale`."""
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


# --- database-level locks ---------------------------------------------------------------------------
_ENGINES: dict[str, object] = {}


def _engine(url: str):
    """One SQLAlchemy engine per URL for lock connections (NullPool: a lock never outlives its
    connection in a pool)."""
    eng = _ENGINES.get(url)
    if eng is None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        eng = _ENGINES[url] = sqlalchemy.create_engine(url, poolclass=NullPool)
    return eng


@contextlib.contextmanager
def db_lock(url: str, name: str, lock_sql: str, unlock_sql: str, lock_id) -> Iterator[None]:
    """Hold the database server's advisory lock `name` (for every host on that server) while inside.

    `lock_sql` / `unlock_sql` take one bind parameter `:lock`, `lock_id(name)` its value."""
    import sqlalchemy

    key = lock_id(name)
    with _engine(url).connect() as conn:
        got = conn.execute(sqlalchemy.text(lock_sql), {"lock": key}).scalar()
        conn.commit()  # the lock is session-level: no transaction stays open while it is held
        if got == 0:  # MySQL's GET_LOCK timed out (PostgreSQL's pg_advisory_lock returns nothing)
            raise TimeoutError(f"could not take the database lock {name!r}: another process held it too long")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a broken connection has released it anyway
                conn.execute(sqlalchemy.text(unlock_sql), {"lock": key})
                conn.commit()
