"""The driver-side Ray Tune callback: one place where trial events become records, the Parquet
table, the Optuna storage, MLflow runs and the live view. Ray calls its hooks in the driver process, in the order the
trial events happen; nothing here runs inside a trial. What happens when a trial ends, whichever
way, is :meth:`StudyCallback.finished` (Optuna is told by the searcher, from the same
:attr:`TrialReport.final_state`).

Ray pickles this object into the experiment (``tuner.pkl``) when the Tuner is created and
unpickles it on ``Tuner.restore``: it therefore holds only plain settings, and builds its live
state (records, MLflow client, rich view) in :meth:`setup`, reading back what an earlier session
wrote, so nothing is logged twice after a resume.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from gcs_tune.tune.optuna_study import OPTUNA_DB, PersistedStudy, storage_url
from gcs_tune.tune.results import TrialRecord, records_from_table, write_table
from gcs_tune.tune.study import StudyDir, StudyInfo
from gcs_tune.tune.tracking import Tracker, flatten
from gcs_tune.tune.trainable import TrialSetup, trial_config
from gcs_tune.tune.trial import TrialReport, TrialState
from gcs_tune.tune.view import LiveView

log = logging.getLogger(__name__)
FINAL_FILES = ("prompt.pt", "config.yaml", "final.json")
LOG_FILES = ("stdout.log", "stderr.log")  # each trial's own output, in its trial folder
FLUSH_EVERY_S = 5.0  # retry period of queued MLflow writes while the server does not answer
FINAL_WAIT_S = 120.0  # how long the end of a study waits for a server that is down
OPTUNA_EVERY_S = 10.0  # learning curves reach the Optuna storage at most this often (starts and ends at once)


def trial_number(trial) -> int:
    """0-based order of creation: Ray's experiment tag starts with the 1-based trial counter."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) - 1 if head.isdigit() else -1


@dataclass
class _Live:
    """The callback's state while Ray runs it: built in ``setup``, never pickled."""

    study: StudyDir
    records: dict[str, TrialRecord]  # Ray trial id -> record
    tracker: Tracker | None
    runs: dict[str, str]  # Ray trial id -> MLflow run id
    view: LiveView | None
    logged: dict[str, int] = field(default_factory=dict)  # Ray trial id -> last epoch its MLflow run holds
    outbox: deque[Callable[[], Any]] = field(default_factory=deque)  # MLflow writes waiting for the server
    flushed_at: float = 0.0
    optuna: PersistedStudy | None = None
    optuna_synced_at: float = 0.0
    checked_resume: bool = False  # the records were checked against the trials Ray restored


class StudyCallback(Callback):
    def __init__(self, info: StudyInfo, setup: TrialSetup, live: bool = True):
        self.info, self.trial_setup, self.live = info, setup, live
        self._state: _Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"info": self.info, "trial_setup": self.trial_setup, "live": self.live, "_state": None}

    # ------------------------------------------------------------ lifecycle

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        """Called by Ray once, before the first trial of this session (fresh or resumed)."""
        study = StudyDir(self.info.storage, self.info.name)
        records = records_from_table(study)
        tracker = self._safe(lambda: Tracker.for_study(self.info))
        runs = (self._safe(tracker.trial_runs) if tracker is not None else None) or {}
        view = LiveView(self.info.name, self.info.trials) if self.live else None
        if view:
            view.start()
        persisted = self._safe(lambda: PersistedStudy(self.info, storage_url(self.info, study.local)))
        self._state = _Live(study, records, tracker, runs, view, optuna=persisted)

    @property
    def records(self) -> dict[str, TrialRecord]:
        return self._state.records if self._state else {}

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        """Called by Ray after every step of its control loop: redraw the view (throttled)."""
        if self._state and not self._state.checked_resume and trials:
            self._forget_unknown({t.trial_id for t in trials})
        if self._state:
            self._flush()
        if self._state and self._state.view:
            self._state.view.update(list(self.records.values()))

    def on_experiment_end(self, trials: list, **info) -> None:
        """Called by Ray when the last trial is done (not on Ctrl-C: the runner saves then)."""
        self.close()

    def close(self) -> None:
        if not self._state:
            return
        tracker = self._state.tracker
        if tracker is not None:  # every trial of the study is known now
            self._send(lambda: tracker.remove_orphans(set(self.records)))
        self._flush(final=True)
        self._save()
        if self._state.optuna is not None:
            self._state.optuna.close()
            if not self.info.optuna_storage:  # a storage URI: the local mirror's copy goes up with the rest
                self._safe(lambda: self._state.study.upload(OPTUNA_DB))
        if self._state.view:
            self._state.view.stop(list(self.records.values()))
            self._state.view = None

    # ------------------------------------------------------------ trials

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        """Called by Ray each time a trial's actor starts: first run, retry, or resumed run."""
        rec = self._record(trial)
        rec.state, rec.started_at = TrialState.RUNNING, time.time()
        live, tid = self._state, trial.trial_id
        if live.tracker is not None:
            def start() -> None:
                earlier = live.runs.get(tid) or rec.mlflow_run_id
                rec.mlflow_run_id, live.logged[tid] = live.tracker.start_trial(
                    tid, f"trial-{rec.number:03d}", self._run_params(rec.params), self.info.name,
                    existing=earlier or None)
                live.runs[tid] = rec.mlflow_run_id
            self._send(start)
        self._sync_optuna(force=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        """Called by Ray in the driver for every epoch a trial reports."""
        rec = self.records.get(trial.trial_id)
        if rec is None:
            return
        report = rec.report = TrialReport.from_ray(result)
        # training time of the current attempt: epoch times add up; epoch 1 starts a new attempt
        rec.train_seconds = (rec.train_seconds if report.epoch > 1 else 0.0) + report.epoch_seconds
        rec.epoch, rec.epochs, rec.started_at = report.epoch, report.epochs, report.started_at
        rec.ended_at = time.time()
        rec.curve[rec.epoch] = report.objective
        live, tid = self._state, trial.trial_id
        if live.tracker is not None:
            def log() -> None:  # runs now, or later from the outbox: reads the run id then
                if rec.mlflow_run_id and report.epoch > live.logged.get(tid, 0):
                    live.tracker.log_run(rec.mlflow_run_id, metrics=report.logged(), step=report.epoch)
                    live.logged[tid] = report.epoch
            self._send(log)
        self._sync_optuna()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        """Called by Ray when a trial ends without an error: finished, diverged, or ASHA-stopped."""
        last = trial.last_result
        self.finished(trial, TrialReport.from_ray(last).final_state if last else TrialState.COMPLETE)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        """Called by Ray when a trial raised and will be retried (FailureConfig.max_failures)."""
        rec = self.records.get(trial.trial_id)
        if rec is not None:
            rec.failures += 1
            rec.error = _error_text(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        """Called by Ray when a trial raised and has no retries left: recorded failed."""
        self.finished(trial, TrialState.FAILED)

    def finished(self, trial, state: TrialState) -> None:
        """A trial ended, in a terminal ``state``: its record, its MLflow run (closed with its final
        files, or its error), the table and the view."""
        if not self._state:
            return
        rec = self._record(trial)  # a trial can fail before it ever started
        rec.state, rec.ended_at, checkpoint = state, time.time(), None
        if state == TrialState.FAILED:
            rec.error, rec.log = _error_text(trial), self._keep_log(trial, rec.number)
            rec.failures += 1
        else:
            checkpoint = trial.checkpoint
            rec.checkpoint = checkpoint.path if checkpoint is not None else ""
        tracker = self._state.tracker
        if tracker is not None:
            self._send(lambda: self._log_final(tracker, rec, checkpoint))
        self._state.runs[rec.trial_id] = rec.mlflow_run_id
        self._save()
        if self._state.view:
            self._state.view.finished(rec)

    def _forget_unknown(self, restored: set[str]) -> None:
        """On the first step of a session: records of trials that Ray does not have -- started or
        finished after its last snapshot by a driver that was killed -- are forgotten. Ray runs
        their numbers again as new trials, so keeping them would count those numbers twice in the
        table and in Optuna (their MLflow runs go as orphans at the end)."""
        self._state.checked_resume = True
        unknown = [tid for tid in self.records if tid not in restored]
        for tid in unknown:
            rec = self.records.pop(tid)
            log.warning("trial %d (%s, %s) ran after Ray's last snapshot of the study; Ray runs its number "
                        "again", rec.number, tid, rec.state)
        if unknown:
            self._save()

    # ------------------------------------------------------------ helpers

    def _record(self, trial) -> TrialRecord:
        """The trial's record; made on its first event (a retried or resumed attempt keeps its
        record: it continues from its checkpoint)."""
        rec = self.records.get(trial.trial_id)
        if rec is None:
            params = dict(trial.config)
            defaults = self.info.space.get("defaults") or None
            rec = TrialRecord(trial.trial_id, trial_number(trial), params,
                              is_default=bool(defaults) and params == defaults,
                              epochs=int(self.info.base["schedule"]["epochs"]))
            self.records[trial.trial_id] = rec
        return rec

    def _save(self) -> None:
        """The records to the Optuna storage, then to the table: a trial that has ended in the
        table has ended in Optuna too."""
        self._sync_optuna(force=True)
        if self._state and self.records:
            self._safe(lambda: write_table(list(self.records.values()), self._state.study))

    def _sync_optuna(self, force: bool = False) -> None:
        """The Optuna storage in step with the records: at once for a start or an end, at most
        every OPTUNA_EVERY_S for learning curves."""
        live = self._state
        if live is None or live.optuna is None or not (force or time.time() - live.optuna_synced_at >= OPTUNA_EVERY_S):
            return
        live.optuna_synced_at = time.time()
        self._safe(lambda: live.optuna.sync([r.row() for r in self.records.values()]))

    def _keep_log(self, trial, number: int) -> str:
        """Copy a failed trial's output into ``<study>/logs/`` (Ray's session folder is temporary);
        on another node, where the driver cannot read it, give its path there."""
        folder = trial_log_folder(trial)
        if folder is None:
            return ""
        if not (folder / LOG_FILES[1]).is_file():
            return f"{folder / LOG_FILES[1]} (on node {getattr(trial, 'node_ip', None) or '?'})"
        logs = self._state.study.local / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in LOG_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, logs / f"trial-{number:03d}.{name}")
        return str(logs / f"trial-{number:03d}.{LOG_FILES[1]}")

    def _run_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Searched values under their short names, every other config value under its key."""
        cfg = trial_config(self.trial_setup, params)
        searched = {self.trial_setup.keys[n] for n in params if n in self.trial_setup.keys}
        fixed = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in searched}
        return {**params, **fixed}

    def _log_final(self, tracker: Tracker, rec: TrialRecord, checkpoint) -> None:
        if not rec.mlflow_run_id:
            return
        if rec.state == TrialState.FAILED:
            tracker.log_run(rec.mlflow_run_id, tags={"state": rec.state, "error": rec.error[-4000:]})
            return tracker.finish(rec.mlflow_run_id, "FAILED")
        feasible = bool(rec.report and rec.report.feasible)
        tracker.log_run(rec.mlflow_run_id, tags={"state": rec.state, "feasible": feasible, "epochs_run": rec.epoch})
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                tracker.log_files(rec.mlflow_run_id, [Path(folder) / f for f in FINAL_FILES])
        tracker.finish(rec.mlflow_run_id, "FINISHED")

    def _send(self, fn: Callable[[], Any]) -> None:
        """Do one MLflow write now, or queue it behind earlier ones that could not be done: while
        the tracking server is unreachable, trials keep training and their records wait here, in
        order, and go out when it answers again (see :meth:`_flush`)."""
        outbox = self._state.outbox
        if not outbox:
            try:
                fn()
                return
            except Exception as exc:  # noqa: BLE001 -- tracking must never end the study
                log.warning("tracking: %s: %s; queueing MLflow writes until it answers", type(exc).__name__, exc)
        outbox.append(fn)

    def _flush(self, final: bool = False) -> None:
        """Send queued writes in order; stop at the first that fails (the server is still down).
        Tried at most every FLUSH_EVERY_S from Ray's loop, so a dead server costs little time; at
        the end of the study, for up to FINAL_WAIT_S."""
        outbox = self._state.outbox
        deadline = time.time() + (FINAL_WAIT_S if final else 0.0)
        if not outbox or (not final and time.time() - self._state.flushed_at < FLUSH_EVERY_S):
            return
        while outbox:
            self._state.flushed_at = time.time()
            try:
                outbox[0]()
                outbox.popleft()
            except Exception as exc:  # noqa: BLE001
                if time.time() >= deadline:
                    if final:
                        log.warning("tracking: %d MLflow write(s) not sent (%s: %s); trials.parquet has every "
                                    "trial", len(outbox), type(exc).__name__, exc)
                    return
                time.sleep(FLUSH_EVERY_S)

    @staticmethod
    def _safe(fn):
        """Tracking must never end the study: an MLflow error is logged and skipped."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            log.warning("tracking: %s: %s", type(exc).__name__, exc)
            return None


def trial_log_folder(trial) -> Path | None:
    """Where Ray wrote the trial's stdout/stderr (``RunConfig(log_to_file=...)``): its working
    directory in the Ray session, on the node that ran it."""
    folder = getattr(getattr(trial, "storage", None), "trial_working_directory", None)
    return Path(folder) if folder else None


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text()[-4000:]
    except OSError:
        pass
    err = trial.get_error() if hasattr(trial, "get_error") else None
    return str(err)[-4000:] if err else "error"
