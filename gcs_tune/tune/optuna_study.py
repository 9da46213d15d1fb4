"""Each study as Optuna sees it: rebuilt from ``trials.parquet`` (the searcher's own study lives in
Ray's searcher state), stored as ``optuna.db`` for ``optuna-dashboard``, and drawn with Optuna's
matplotlib plots.

A ``FrozenTrial`` per row with the space's distributions (a bound naming another parameter widened
to its whole range, so all trials share one search space and the importance and contour plots see
every parameter), the base floor as the searcher's constraint, PRUNED / FAIL from the state column
and the per-epoch validation objective as intermediate values.

The rebuilt study is in the user's terms, like the table: ``beta2`` itself, where the searcher's
own study samples its unit position ``beta2_u`` (see ``space.SpaceSampler``). The plots are for
reading values off, so they show the values the trials ran with."""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, create_trial
from optuna.trial import TrialState as OptunaState

from gcs_tune.tune.plots import png_bytes
from gcs_tune.tune.results import trial_params
from gcs_tune.tune.space import Param
from gcs_tune.tune.study import StudyInfo
from gcs_tune.tune.trial import TrialState

OPTUNA_DB = "optuna.db"
CONSTRAINT = "base_floor"  # points of base accuracy below the floor; <= 0 is feasible (the searcher's too)
STATES = {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.PRUNED: OptunaState.PRUNED,
          TrialState.DIVERGED: OptunaState.COMPLETE,  # told COMPLETE at a worst value
          TrialState.FAILED: OptunaState.FAIL, TrialState.RUNNING: OptunaState.RUNNING}


def dashboard_command(study_folder: Path) -> str:
    return f"optuna-dashboard sqlite:///{Path(study_folder).resolve() / OPTUNA_DB}"


def distributions(params: dict[str, dict[str, Any]]) -> dict[str, BaseDistribution]:
    """Optuna distributions of a saved space (``study.yaml``'s ``space.params``) in the user's
    terms, as ``space._suggest`` declares a parameter with numeric bounds; one with a bound naming
    another parameter gets its whole range (it is not its unit position here)."""
    out: dict[str, BaseDistribution] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for name, raw in params.items():
        p = Param.model_validate(raw)
        span = p.numeric_range(ranges)
        if span is not None:
            ranges[name] = span
        if p.type == "choice":
            out[name] = CategoricalDistribution(p.values)
        elif p.type == "int":
            out[name] = IntDistribution(math.ceil(span[0]), math.floor(span[1]), log=p.log, step=int(p.step or 1))
        else:
            out[name] = FloatDistribution(span[0], span[1], log=p.type == "loguniform", step=p.step)
    return out


def frozen_trial(row: dict[str, Any], dists: dict[str, BaseDistribution]) -> FrozenTrial:
    """One row of trials.parquet as the trial Optuna was told about."""
    state = STATES.get(row["state"], OptunaState.FAIL)
    curve = {int(e): float(v) for e, v in json.loads(row.get("curve_json") or "{}").items() if _finite(v)}
    value = None
    if state == OptunaState.COMPLETE:
        value = float(row["objective"]) if _finite(row["objective"]) else None
        state = state if value is not None else OptunaState.FAIL
    elif state == OptunaState.PRUNED and curve:
        value = curve[max(curve)]  # what Optuna's tell(PRUNED) records: the last intermediate value
    reported = state in (OptunaState.COMPLETE, OptunaState.PRUNED) and _finite(row.get("violation"))
    params = trial_params(row)
    attrs = {k: float(row[k]) for k in ("hm", "base_acc", "novel_acc", "violation") if _finite(row.get(k))}
    attrs.update(ray_trial_id=str(row["trial_id"]), is_default=bool(row.get("is_default")), state=row["state"],
                 mlflow_run_id=str(row.get("mlflow_run_id") or ""))
    trial = create_trial(state=state, value=value, params=params, distributions={n: dists[n] for n in params},
                         intermediate_values=curve, user_attrs=attrs,
                         constraints={CONSTRAINT: float(row["violation"])} if reported else None)
    start, end = (_when(row.get(k)) for k in ("started_at", "ended_at"))
    trial.datetime_start = start or end or trial.datetime_start
    if state != OptunaState.RUNNING:
        trial.datetime_complete = max(end or trial.datetime_start, trial.datetime_start)
    return trial


def rebuild_study(info: StudyInfo, frame: pd.DataFrame) -> tuple[optuna.Study, list[str]]:
    """The in-memory Optuna study of ``frame`` (and a note per row it could not take)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=info.name, direction="maximize")
    study.set_user_attr("objective", "validation HM with a base floor (penalised below it)")
    dists, notes = distributions(info.space["params"]), []
    for row in frame.sort_values("number").to_dict("records") if not frame.empty else []:
        try:
            study.add_trial(frozen_trial(row, dists))
        except (ValueError, KeyError) as exc:  # a hand-edited table or an older space
            notes.append(f"trial {row.get('number')}: left out of the Optuna study ({exc})")
    return study, notes


def save_study(study: optuna.Study, path: Path) -> Path:
    """``study`` as an sqlite RDB storage at ``path``, written beside it and renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # Optuna creates its own schema in a fresh file
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
        copy = optuna.create_study(storage=storage, study_name=study.study_name, directions=study.directions)
        for key, value in study.user_attrs.items():
            copy.set_user_attr(key, value)
        copy.add_trials(study.get_trials(deepcopy=False))
        storage.engine.dispose()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def optuna_figures(study: optuna.Study, info: StudyInfo) -> list[tuple[str, bytes | str]]:
    """(caption, PNG or why it is missing) of Optuna's plots of ``study``."""
    from optuna.visualization import matplotlib as ovm

    by_key = {p["key"]: n for n, p in info.space["params"].items()}
    contour = [by_key[k] for k in ("method.rho", "method.beta1") if k in by_key]
    target = "objective (validation HM, penalised below the floor)"
    plots = [("optimisation history (grey: infeasible, below the base floor)",
              lambda: ovm.plot_optimization_history(study, target_name=target)),
             ("parameter importances for the objective", lambda: ovm.plot_param_importances(study)),
             ("ρ × β1 contour of the objective", (lambda: ovm.plot_contour(study, params=contour))
              if len(contour) == 2 else None),
             ("learning curves: validation objective by epoch (intermediate values)",
              lambda: ovm.plot_intermediate_values(study)),
             ("timeline of the trials", lambda: ovm.plot_timeline(study))]
    return [(caption, _draw(make)) for caption, make in plots if make is not None]


def _draw(make) -> bytes | str:
    """Run an Optuna plot function in a private matplotlib style (Optuna sets ggplot globally)."""
    with matplotlib.rc_context({"figure.figsize": (8, 5)}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning, "no feasible trials" and the like
        try:
            ax = make()
        except Exception as exc:  # noqa: BLE001 -- too few trials for a plot must not lose the page
            return f"not drawn: {type(exc).__name__}: {exc}"
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        legend = first.get_legend()
        if legend is not None and len(legend.get_texts()) <= 3:  # the history's: inside, so the axes keep the width
            first.legend(loc="best", fontsize=8)
        return png_bytes(first.figure, layout=False)


def _when(ts: Any) -> datetime | None:
    return datetime.fromtimestamp(float(ts)) if _finite(ts) else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
