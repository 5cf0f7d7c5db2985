"""Optuna's private API, in one place: every access of sweep/ to an underscored attribute of an
Optuna object goes through a function here, so an Optuna release that renames one breaks this
module (and tests/test_optuna_compat.py) only.

Checked against optuna 4.5 through 5.1 (pyproject.toml bounds it: optuna>=4.5,<6). The private
attributes used:

- `Study._storage`: the study's storage (Study exposes no public accessor), a `_CachedStorage`
  around an `RDBStorage` on a database, a `JournalStorage` otherwise;
- `Study._study_id`: the storage's id of the study;
- `Trial._trial_id`: the storage's id of a trial (not its `number`);
- `_CachedStorage._backend`: the `RDBStorage` inside the cache (a `JournalStorage` has a `_backend`
  too, its `JournalFileBackend`).

The storage methods called on what these return (`get_trial`, `set_trial_user_attr`,
`set_trial_state_values`, `get_all_trials`, `record_heartbeat`, ...) are Optuna's public
`BaseStorage` interface, and `optuna.Trial(study, trial_id)` its public constructor.
"""
from __future__ import annotations

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

__all__ = ["frozen_trial", "storage_of", "study_id", "trial_id", "trial_id_of_number", "unwrapped_storage"]


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage `study` reads and writes (`Study._storage`)."""
    return study._storage  # noqa: SLF001


def study_id(study: optuna.Study) -> int:
    """The storage's id of `study` (`Study._study_id`)."""
    return study._study_id  # noqa: SLF001


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a live trial (`Trial._trial_id`; not its `number`)."""
    return trial._trial_id  # noqa: SLF001


def unwrapped_storage(storage: BaseStorage) -> BaseStorage:
    """The storage under Optuna's in-process cache (`_CachedStorage._backend`: the `RDBStorage` of
    a database, whose `record_heartbeat` a shared queue calls). On a journal this is the journal's
    file backend (`JournalStorage._backend`), which a local queue never uses; on a storage with no
    `_backend`, `storage` itself."""
    return getattr(storage, "_backend", storage)


def trial_id_of_number(study: optuna.Study, number: int) -> int:
    """The storage's id of the trial numbered `number` in `study`."""
    return storage_of(study).get_trial_id_from_study_id_trial_number(study_id(study), number)


def frozen_trial(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """A live trial's stored state (its `system_attrs`, `state`), read from the storage."""
    return storage_of(study).get_trial(trial_id(trial))
