"""After ``Tuner.fit`` returns (finished or Ctrl-C): the plots, the parent run's summary, and what
the user reads last -- the best feasible trial, where everything went, the ``mlflow ui`` command.
Also the CoOp reference's own MLflow run, logged before the study starts."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import yaml
from rich.console import Console

from gcs_tune.config import ObjectiveConfig
from gcs_tune.objective import resolve_floor
from gcs_tune.tune.optuna_study import dashboard_command
from gcs_tune.tune.plots import make_plots
from gcs_tune.tune.report import write_report
from gcs_tune.tune.results import TABLE, Winner, describe_trial, read_table, select_winner
from gcs_tune.tune.study import StudyDir, StudyInfo
from gcs_tune.tune.tracking import Tracker, flatten, is_server_uri
from gcs_tune.tune.trial import TERMINAL, TrialReport, TrialState

console = Console(soft_wrap=True)  # long lines (paths, commands) must stay copyable


@dataclass(frozen=True)
class Outcome:
    study: StudyDir
    info: StudyInfo
    done: int  # trials in a terminal state
    interrupted: bool
    winner: Winner | None
    started_at: float  # unix time Tuner.fit started in this session
    seconds: float  # its wall time

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0


def mlflow_ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def log_reference(tracker: Tracker, info: StudyInfo, epochs: list[TrialReport]) -> dict[str, Any]:
    """The CoOp reference as its own run (role=reference), linked to the study's parent run."""
    last = epochs[-1]
    run_id = tracker.side_run("reference", "coop-reference", info.name)
    tracker.log_run(run_id, params={**flatten(info.base), "method.name": "coop", "objective.floor": "none"})
    for m in epochs:
        tracker.log_run(run_id, metrics=m.logged(), step=m.epoch)
    tracker.log_run(run_id, tags={"diverged": last.diverged})
    tracker.finish(run_id, "FAILED" if last.diverged else "FINISHED")
    tracker.log_run(tracker.parent_id, tags={"gcs_tune.reference_run_id": run_id})
    return {"run_id": run_id, "base_acc": last.base_acc, "novel_acc": last.novel_acc, "hm": last.hm,
            "epochs": last.epoch, "diverged": last.diverged}


def finish_study(study: StudyDir, info: StudyInfo, started_at: float) -> Outcome:
    """Summarise the study as it stands (complete or interrupted) in MLflow and on the terminal."""
    seconds = time.time() - started_at
    frame = read_table(study)
    done = int(frame["state"].isin(TERMINAL).sum()) if not frame.empty else 0
    interrupted = done < info.trials
    winner = select_winner(frame)
    floor = _floor(info)
    plots = make_plots(frame, study.local / "plots", floor) if not frame.empty else []
    for p in plots:
        study.upload(f"plots/{p.name}")
    experiment_id = _log_parent(info, study, frame, winner, plots, floor, interrupted, done, seconds)
    _print_summary(info, study, frame, winner, floor, interrupted, done, seconds, experiment_id)
    try:  # the study's page (and optuna.db for optuna-dashboard); its failure must not fail the study
        report = write_report(study.local)
        Tracker.for_study(info).log_files(info.parent_run_id, [report])
        console.print(f"report:        {report}")
    except Exception as exc:  # noqa: BLE001 -- everything else is saved; say what went wrong
        console.print(f"[yellow]report not written[/]: {type(exc).__name__}: {exc}")
    return Outcome(study, info, done, interrupted, winner, started_at, seconds)


def _floor(info: StudyInfo) -> float | None:
    """The study's base floor when it is one number: absolute, or the CoOp reference's once it is
    trained. A zero-shot floor is resolved inside each trial."""
    obj = info.base["objective"]
    if obj["floor"] == "zero_shot" or obj.get("value") is None:
        return None
    return resolve_floor(ObjectiveConfig.model_validate(obj), None)


def _log_parent(info, study, frame, winner, plots, floor, interrupted, done, seconds) -> str:
    """Log the study's summary on its parent run; returns the MLflow experiment id."""
    tracker = Tracker.for_study(info)
    optuna_file = study.local / "optuna.yaml"
    metrics = {"trials_done": float(done), "search_seconds": seconds}
    if floor is not None:
        metrics["base_floor"] = floor
    tags: dict[str, Any] = {"state": "interrupted" if interrupted else "finished"}
    if not frame.empty:
        for state in TERMINAL:
            metrics[f"trials_{state}"] = float((frame["state"] == state).sum())
    if winner is not None:
        row = winner.row
        metrics.update(best_hm=row["hm"], best_base_acc=row["base_acc"], best_novel_acc=row["novel_acc"],
                       best_objective=row["objective"])
        tags.update(best_trial=int(row["number"]), best_feasible=winner.feasible,
                    best_params=json.dumps({k[6:]: _plain(v) for k, v in row.items() if k.startswith("param.")}))
    if optuna_file.is_file():
        best = (yaml.safe_load(optuna_file.read_text()) or {}).get("best")
        tags["optuna_best"] = json.dumps(best)[:4000] if best else "none feasible"
    tracker.log_run(info.parent_run_id, metrics={k: v for k, v in metrics.items() if _finite(v)}, tags=tags)
    files = [study.local / n for n in ("study.yaml", TABLE, "optuna.yaml")] + list(plots)
    tracker.log_files(info.parent_run_id, [f for f in files if f.suffix != ".png"])
    tracker.log_files(info.parent_run_id, [f for f in files if f.suffix == ".png"], "plots")
    tracker.finish(info.parent_run_id, "KILLED" if interrupted else "FINISHED")
    return tracker.experiment_id


def _print_summary(info, study, frame, winner, floor, interrupted, done, seconds, experiment_id) -> None:
    console.rule(f"study {info.name}")
    counts = ", ".join(f"{(frame['state'] == s).sum()} {s}" for s in TERMINAL) if not frame.empty else "no trials"
    console.print(f"{done}/{info.trials} trials done in {seconds:.0f} s ({counts})")
    if info.base["objective"]["selection"] == "pseudo_novel":
        console.print("selection pseudo_novel: the validation numbers below are pseudo-base / pseudo-novel, two "
                      "halves of the base classes; no novel class was read (`gcs_tune.best --export` measures them)")
    if info.reference:
        ref = info.reference
        console.print(f"CoOp reference (validation): base {ref['base_acc']:.2f}, novel {ref['novel_acc']:.2f}, "
                      f"HM {ref['hm']:.2f}; base floor {floor:.2f}")
    if winner is None:
        console.print("[yellow]no trial finished all its epochs yet[/]")
    else:
        console.print(describe_trial("best feasible trial" if winner.feasible else
                                     "[bold red]NO TRIAL MET THE BASE FLOOR[/] -- least violation", winner.row))
    default = frame[frame["is_default"]] if not frame.empty else frame
    if not default.empty:
        console.print(describe_trial("defaults (enqueued first)", default.iloc[0].to_dict()))
    failed = frame[frame["state"] == TrialState.FAILED] if not frame.empty else frame
    for row in failed.to_dict("records"):
        console.print(f"[red]trial {int(row['number'])} failed[/] ({str(row.get('error', '')).strip().splitlines()[-1:]}); "
                      f"its output: {row.get('log') or 'see the Ray session logs'}")
    console.print(f"study folder:  {study.ray_path}")
    console.print(f"trials table:  {study.ray_path}/{TABLE}")
    console.print(f"MLflow:        {info.tracking_uri} (experiment {info.experiment!r})")
    console.print(f"compare trials: [bold]{mlflow_ui_command(info.tracking_uri)}[/]")
    server = info.tracking_uri if is_server_uri(info.tracking_uri) else "http://127.0.0.1:5000"
    console.print(f"  then open {server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning "
                  "(the parent run lists one child per trial)")
    console.print(f"Optuna study:  [bold]{dashboard_command(info, study.local)}[/] (pip install optuna-dashboard; "
                  f"or optuna.load_study(study_name={info.name!r}, storage=...))", soft_wrap=True)
    if interrupted:
        console.print(f"[yellow]interrupted[/]: resume with [bold]python -m gcs_tune.search --resume "
                      f"--name {info.name} --storage {info.storage}[/]")
    else:
        console.print(f"retrain the winner: [bold]python -m gcs_tune.best --storage {info.storage} "
                      f"--name {info.name} --export[/]")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v
