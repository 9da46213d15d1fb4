"""The study as Optuna storage (gcs_tune.tune.optuna_study.PersistedStudy), read back by a second
connection as optuna-dashboard or ``optuna.load_study`` would while the search runs: trials appear
when they start, learning curves grow, ends are told with their constraint; the stored study is
written again only when the records disagree with it (trials a killed driver ran after Ray's last
snapshot, whose numbers Ray runs again)."""
from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState as O

from gcs_tune.config import ConfigError
from gcs_tune.tune.optuna_study import PersistedStudy, check_storage_url, storage_url
from gcs_tune.tune.results import TrialRecord
from gcs_tune.tune.study import StudyInfo
from gcs_tune.tune.trial import TrialReport, TrialState

PARAMS = {"rho": {"key": "method.rho", "type": "loguniform", "low": 1e-3, "high": 1.0},
          "n_ctx": {"key": "prompt.n_ctx", "type": "choice", "values": [2, 4]}}


def info(tmp_path, url: str = "") -> StudyInfo:
    return StudyInfo(name="s", storage=str(tmp_path), space_path="x.yaml", space={"params": PARAMS}, base={},
                     overrides={}, trials=4, gpus=0, resources={"cpu": 1}, max_concurrent=2, tracking_uri="",
                     experiment="s", optuna_storage=url)


def record(number: int, rho: float, epochs_done: int = 0, state=TrialState.RUNNING, violation=-1.0) -> TrialRecord:
    rec = TrialRecord(f"t{number}-{rho}", number, {"rho": rho, "n_ctx": 4}, state=state, epochs=4,
                      started_at=time.time())
    for e in range(1, epochs_done + 1):
        rec.curve[e] = 50.0 + e
        rec.report = TrialReport(epoch=e, epochs=4, objective=50.0 + e, hm=50.0 + e, base_acc=70.0, novel_acc=40.0,
                                 feasible=violation <= 0, violation=violation)
    rec.epoch = epochs_done
    if state != TrialState.RUNNING:
        rec.ended_at = time.time()
    return rec


def reader(url: str) -> list[optuna.trial.FrozenTrial]:
    """What another process sees: a fresh connection to the storage."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name="s", storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def test_trials_appear_as_they_start_grow_and_end_in_one_stored_study(tmp_path):
    url = storage_url(info(tmp_path), tmp_path)
    persisted = PersistedStudy(info(tmp_path), url)
    study_id = persisted.study._study_id
    a = record(0, 0.1, epochs_done=1)
    persisted.sync([a.row()])
    [t] = reader(url)
    assert (t.number, t.state, t.intermediate_values, t.params) == (0, O.RUNNING, {1: 51.0}, {"rho": 0.1, "n_ctx": 4})

    a = record(0, 0.1, epochs_done=3)
    b = record(1, 0.5)
    persisted.sync([a.row(), b.row()])
    t, u = reader(url)
    assert t.intermediate_values == {1: 51.0, 2: 52.0, 3: 53.0} and u.state == O.RUNNING

    a = record(0, 0.1, epochs_done=4, state=TrialState.COMPLETE)
    b = record(1, 0.5, epochs_done=2, state=TrialState.PRUNED, violation=3.0)
    persisted.sync([a.row(), b.row()])
    t, u = reader(url)
    assert (t.state, t.value, t.constraints) == (O.COMPLETE, 54.0, {"base_floor": -1.0})
    assert (u.state, u.value, u.constraints) == (O.PRUNED, 52.0, {"base_floor": 3.0})
    assert persisted.study._study_id == study_id  # updated in place, never written again
    persisted.close()


def test_a_trial_not_started_yet_holds_back_the_ones_after_it(tmp_path):
    """Optuna numbers trials in the order they are added: trial 2 waits for trial 1."""
    url = storage_url(info(tmp_path), tmp_path)
    persisted = PersistedStudy(info(tmp_path), url)
    persisted.sync([record(0, 0.1).row(), record(2, 0.3).row()])
    assert [t.number for t in reader(url)] == [0]
    persisted.sync([record(0, 0.1).row(), record(1, 0.2).row(), record(2, 0.3).row()])
    assert [(t.number, t.params["rho"]) for t in reader(url)] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    persisted.close()


def test_numbers_run_again_after_a_killed_driver_replace_what_it_stored(tmp_path):
    """Trials 1 and 2 were stored by a driver killed before Ray's snapshot knew them; the resumed
    study runs number 1 again with other values: the stored study follows the records."""
    url = storage_url(info(tmp_path), tmp_path)
    killed = PersistedStudy(info(tmp_path), url)
    done = record(0, 0.1, epochs_done=4, state=TrialState.COMPLETE)
    killed.sync([done.row(), record(1, 0.2, epochs_done=4, state=TrialState.COMPLETE).row(), record(2, 0.3).row()])
    killed.close()

    resumed = PersistedStudy(info(tmp_path), url)
    resumed.sync([done.row()])  # the records Ray restored
    assert [(t.number, t.state) for t in reader(url)] == [(0, O.COMPLETE)]
    resumed.sync([done.row(), record(1, 0.7).row()])
    assert [(t.number, t.params["rho"], t.state) for t in reader(url)] == [(0, 0.1, O.COMPLETE), (1, 0.7, O.RUNNING)]
    resumed.close()


def test_a_row_that_is_not_a_trial_of_the_space_keeps_its_number_as_failed(tmp_path):
    url = storage_url(info(tmp_path), tmp_path)
    persisted = PersistedStudy(info(tmp_path), url)
    bad = record(1, 0.2).row() | {"params_json": '{"rho": 5.0, "n_ctx": 4}'}  # outside [1e-3, 1]
    persisted.sync([record(0, 0.1).row(), bad, record(2, 0.3).row()])
    assert [(t.number, t.state) for t in reader(url)] == [(0, O.RUNNING), (1, O.FAIL), (2, O.RUNNING)]
    assert persisted.notes and persisted.notes[0].startswith("trial 1:")
    persisted.close()


def test_optuna_storage_url_is_checked_and_used(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert storage_url(info(tmp_path, url), tmp_path) == url
    with pytest.raises(ConfigError, match="--optuna-storage nosuch://x"):
        check_storage_url("nosuch://x")
