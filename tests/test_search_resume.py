"""Ctrl-C and --resume: a real SIGINT to the driver while trials run (Ray Tune's own handler saves
the experiment), then ``--resume`` finishes the study: the full trial count, each trial once in
the Parquet table, in MLflow (one child run per trial, one value per epoch) and in Optuna's
restored history. Real Ray (once for this module), ASHA on, CPU, the lab."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import yaml

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402

from gcs_tune import search  # noqa: E402
from gcs_tune.tune.results import read_table  # noqa: E402
from gcs_tune.tune.study import StudyDir, StudyInfo  # noqa: E402
from gcs_tune.tune.trial import TERMINAL  # noqa: E402

TRIALS = 5


def interrupt_after_first_trial(study: StudyDir, stop: threading.Event) -> None:
    """Send SIGINT (Ctrl-C) once the table shows a finished trial and others still to go."""
    while not stop.is_set():
        frame = read_table(study) if (study.local / "trials.parquet").exists() else None
        if frame is not None and 1 <= frame["state"].isin(TERMINAL).sum() < TRIALS:
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.2)


def test_interrupt_then_resume_finishes_without_duplicates(ray_cluster, tmp_path, fast_space):
    space = fast_space(tmp_path, trials=TRIALS, scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                       objective={"floor": "zero_shot", "tolerance": 5.0})
    storage = str(tmp_path / "s")
    study = StudyDir(storage, "resumable")
    previous = signal.signal(signal.SIGINT, lambda *a: None)  # a stray signal must never reach pytest
    stop = threading.Event()
    watcher = threading.Thread(target=interrupt_after_first_trial, args=(study, stop), daemon=True)
    try:
        watcher.start()
        code = search.main(["--space", str(space), "--gpus", "0", "--storage", storage, "--name", "resumable",
                            "--quiet", "schedule.epochs=3"])
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    assert code == 130, "the first run should have been interrupted"
    before = read_table(study)
    assert before["state"].isin(TERMINAL).sum() < TRIALS

    assert search.main(["--resume", "--name", "resumable", "--storage", storage, "--quiet"]) == 0

    frame = read_table(study)
    assert len(frame) == TRIALS and frame["trial_id"].is_unique
    assert frame["state"].isin(TERMINAL).all() and frame["is_default"].sum() == 1
    done_before = before[before["state"].isin(TERMINAL)].set_index("trial_id")
    kept = frame.set_index("trial_id").loc[done_before.index]
    assert (kept["mlflow_run_id"] == done_before["mlflow_run_id"]).all()  # finished trials were not rerun

    info = StudyInfo.load(study)
    client = MlflowClient(info.tracking_uri)
    exp = client.get_experiment_by_name(info.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == info.parent_run_id]
    assert len(children) == TRIALS
    assert sorted(r.data.tags["gcs_tune.trial_id"] for r in children) == sorted(frame["trial_id"])
    assert len([r for r in runs if r.data.tags.get("gcs_tune.role") == "study"]) == 1
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "objective")]
        assert steps == sorted(set(steps)), f"epochs logged twice in {run.info.run_name}: {steps}"
        assert run.info.status == "FINISHED"
    assert client.get_run(info.parent_run_id).info.status == "FINISHED"

    optuna_view = yaml.safe_load((study.local / "optuna.yaml").read_text())
    assert sum(optuna_view["states"].values()) == TRIALS  # the restored searcher kept its history
    assert "running" not in optuna_view["states"]
    pruned = (frame["state"] == "pruned").sum()
    assert optuna_view["states"].get("pruned", 0) == pruned


def test_a_second_driver_of_a_running_study_is_refused(tmp_path, fast_space, capsys):
    """The lock a running driver holds (taken here as that driver would) makes ``--resume``
    exit 2 with a message, before Ray or MLflow is touched; released, the lock is free again."""
    storage = str(tmp_path / "s")
    study = StudyDir(storage, "busy")
    study.local.mkdir(parents=True)
    (study.local / "study.yaml").write_text(yaml.safe_dump({"name": "busy"}))  # read only after the lock
    with study.lock():
        code = search.main(["--resume", "--name", "busy", "--storage", storage, "--quiet"])
        assert code == 2
        assert "being run by another driver (pid" in " ".join(capsys.readouterr().err.split())
    with study.lock():  # the first holder released it
        pass
