"""sweep.study.optuna_compat against the installed Optuna: every function that reaches into Optuna's
private attributes, on an in-memory SQLite study (a cached RDBStorage) and on a journal study."""
from __future__ import annotations

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sweep.study import optuna_compat as oc

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sqlite_study():
    return optuna.create_study(storage="sqlite:///:memory:", directions=["maximize", "minimize"])


def _journal_study(tmp_path):
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    return optuna.create_study(storage=storage, study_name="j"), storage


def test_storage_of_and_unwrapped_storage_on_a_database():
    study = _sqlite_study()
    storage = oc.storage_of(study)
    assert storage is not None and hasattr(storage, "get_trial")
    inner = oc.unwrapped_storage(storage)
    assert isinstance(inner, RDBStorage)  # under Optuna's _CachedStorage
    assert oc.unwrapped_storage(inner) is inner
    assert hasattr(inner, "record_heartbeat")  # what a shared queue calls on it


def test_storage_of_and_unwrapped_storage_on_a_journal(tmp_path):
    study, storage = _journal_study(tmp_path)
    assert oc.storage_of(study) is storage
    assert isinstance(oc.unwrapped_storage(storage), JournalFileBackend)  # JournalStorage._backend


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_ids_and_frozen_trial(kind, tmp_path):
    study = _sqlite_study() if kind == "sqlite" else _journal_study(tmp_path)[0]
    sid = oc.study_id(study)
    assert isinstance(sid, int)
    assert oc.storage_of(study).get_study_id_from_name(study.study_name) == sid
    study.enqueue_trial({"x": 1.0})
    first = study.ask()
    second = study.ask()
    for t in (first, second):
        tid = oc.trial_id(t)
        assert isinstance(tid, int)
        assert oc.trial_id_of_number(study, t.number) == tid
        ft = oc.frozen_trial(study, t)
        assert ft.number == t.number and ft.state == TrialState.RUNNING
    assert oc.frozen_trial(study, first).system_attrs.get("fixed_params") == {"x": 1.0}
    assert oc.trial_id(first) != oc.trial_id(second)
    # the id is what the public Trial constructor and the storage's public methods take
    same = optuna.Trial(study, oc.trial_id(first))
    assert same.number == first.number
