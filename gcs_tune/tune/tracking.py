"""MLflow, written only by the driver (the only module that imports mlflow).

One experiment per study, a parent run for the study, one child run per trial (tag
``mlflow.parentRunId``) keyed by its Ray trial id, the CoOp reference and the export as their
own runs linked to the study by tags. Idempotent across ``--resume``: runs are found again by
tag; a trial that restarts (retry, resume) continues its run from its last checkpoint and never
logs an epoch twice. sqlite allows one writer, which is why trials never log themselves.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # research clusters are often offline
# The client's own retries (7, doubling from 2 s) would hold Ray's driver loop, and with it every
# trial's next report, for minutes while a server is down; the study callback queues what fails
# and sends it when the server answers again, so one call gives up after a few seconds.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per run would bury the live view
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TAG_STUDY, TAG_ROLE, TAG_TRIAL = "gcs_tune.study", "gcs_tune.role", "gcs_tune.trial_id"
TAG_STUDY_RUN, TAG_PARENT = "gcs_tune.study_run_id", "mlflow.parentRunId"
TAG_SELECTION = "gcs_tune.selection"  # pseudo_novel | all_classes: what validation numbers mean
# MLflow 3 opens an experiment on its GenAI view unless it is tagged as model training
TAG_KIND, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


def default_tracking_uri(study_dir: Path) -> str:
    """An absolute sqlite store in the study folder (MLflow 3.13+ refuses ./mlruns)."""
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///rel.db`` (three slashes: relative) or a bare path, made absolute: trials and
    ``mlflow ui`` run from other working directories."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def is_server_uri(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


class Tracker:
    """A thin MlflowClient wrapper bound to one study's experiment and parent run. ``tags`` go on
    every run it creates (the selection protocol, so no number is read without knowing it)."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None, parent_id: str | None = None,
                 tags: dict[str, str] | None = None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:  # artifacts beside the study, absolute: sqlite's default is ./mlartifacts of the CWD
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root,
                                                               tags={TAG_KIND: KIND_TRAINING})
        self.parent_id = parent_id  # the study's run: trials and side runs are its children
        self.tags = dict(tags or {})

    @classmethod
    def for_study(cls, info) -> "Tracker":
        """The tracker of a saved study (a :class:`~gcs_tune.tune.study.StudyInfo`)."""
        return cls(info.tracking_uri, info.experiment, parent_id=info.parent_run_id,
                   tags={TAG_SELECTION: info.base["objective"]["selection"]})

    # ------------------------------------------------------------ runs of the study

    def open_study(self, name: str, run_id: str | None, tags: dict[str, str]) -> str:
        """Create the study's parent run, or reopen it on resume. Returns its id."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={TAG_STUDY: name, TAG_ROLE: "study", **self.tags, **tags})
            run_id = run.info.run_id
        self.parent_id = run_id
        return run_id

    def log_run(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                step: int | None = None, tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        m = [Metric(k, float(v), now, step or 0) for k, v in (metrics or {}).items()]
        p = [Param(k, _param_text(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(m), len(p), len(t), 1), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(run_id, metrics=m[i:i + 100], params=p[i:i + 100], tags=t[i:i + 100])

    def log_files(self, run_id: str, paths: Iterable[Path], folder: str | None = None) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), folder)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def side_run(self, role: str, name: str, study: str, tags: dict[str, str] | None = None) -> str:
        """A run linked to the study but not one of its trials (the reference, an export)."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            TAG_STUDY: study, TAG_ROLE: role, TAG_STUDY_RUN: self.parent_id or "", **self.tags, **(tags or {})})
        return run.info.run_id

    # ------------------------------------------------------------ trials

    def trial_runs(self) -> dict[str, str]:
        """Ray trial id -> run id of the parent's live child runs."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_PARENT}` = '{self.parent_id}'",
                                       max_results=50000)
        return {r.data.tags.get(TAG_TRIAL, ""): r.info.run_id for r in runs}

    def remove_orphans(self, trial_ids: set[str]) -> int:
        """Delete the child runs of trials the study does not have: a driver killed with SIGKILL
        may have started a trial after Ray's last snapshot of the experiment, and ``--resume``
        never sees that trial again (its searcher suggests a new one in its place)."""
        orphans = [run_id for tid, run_id in self.trial_runs().items() if tid not in trial_ids]
        for run_id in orphans:
            self.client.delete_run(run_id)
        return len(orphans)

    def start_trial(self, trial_id: str, run_name: str, params: dict[str, Any], study: str,
                    existing: str | None = None) -> tuple[str, int]:
        """The child run of a trial attempt and the last epoch it holds. A retried or resumed
        attempt continues the run of the earlier one (it resumes from its last checkpoint); the
        epochs already logged are not logged again."""
        if existing:
            try:
                self.client.update_run(existing, status="RUNNING")
                history = self.client.get_metric_history(existing, "objective")
                return existing, max((m.step for m in history), default=0)
            except Exception:  # noqa: BLE001 -- deleted by hand, or another store: start afresh
                pass
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            TAG_PARENT: self.parent_id, TAG_TRIAL: trial_id, TAG_STUDY: study, TAG_ROLE: "trial", **self.tags})
        self.log_run(run.info.run_id, params=params)
        return run.info.run_id, 0


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]
