"""Each study as Optuna sees it: kept in Optuna storage (``optuna.db``, or ``--optuna-storage``)
from the trial records while the search runs (the searcher's own study lives in Ray's searcher
state), opened by ``optuna.load_study`` and ``optuna-dashboard``, and drawn with Optuna's
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
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, create_trial
from optuna.trial import TrialState as OptunaState

from gcs_tune.config import ConfigError
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


def storage_url(info: StudyInfo, study_folder: Path) -> str:
    """The study's Optuna storage: ``--optuna-storage``, else ``<study>/optuna.db``."""
    return info.optuna_storage or f"sqlite:///{Path(study_folder).resolve() / OPTUNA_DB}"


def check_storage_url(url: str) -> None:
    """``--optuna-storage``: an RDB URL Optuna can open (and write its schema to), checked before
    anything runs."""
    try:
        optuna.storages.RDBStorage(url).engine.dispose()
    except Exception as exc:  # noqa: BLE001 -- SQLAlchemy's and the driver's errors alike
        raise ConfigError(f"--optuna-storage {url}: Optuna cannot open it ({type(exc).__name__}: {exc}); give an "
                          f"RDB URL such as sqlite:////shared/optuna.db or postgresql://user@host/db") from None


def dashboard_command(info: StudyInfo, study_folder: Path) -> str:
    return f"optuna-dashboard {storage_url(info, study_folder)}"


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


class PersistedStudy:
    """The study in Optuna storage, kept in step with its trial records while the search runs:
    ``optuna.load_study`` and optuna-dashboard open it at any time, and its trial numbers are the
    study's (the table's, the MLflow run names', the console's).

    The searcher keeps its own in-memory study, saved in Ray's searcher snapshot: that snapshot
    is what a ``--resume`` continues from, and a storage the searcher wrote to directly would run
    ahead of it (trials asked or finished after the last snapshot are asked again, and Optuna
    refuses a second ``tell``). So this study is written from the records, which Ray's snapshot
    decides too: every sync adds the trials it lacks and finishes the RUNNING ones that ended
    (their learning curves as they grow); when the storage disagrees with the records -- trials
    of a killed driver that Ray re-runs under the same numbers, or a hand-edited table -- the
    study is written again from the records."""

    def __init__(self, info: StudyInfo, url: str):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.name = info.name
        self.storage = optuna.storages.RDBStorage(url)
        self.dists = distributions(info.space["params"])
        self.study = self._open()
        self.stored: list[FrozenTrial] | None = None  # what the storage holds, by number (this is its only writer)
        self.seen: dict[int, str] = {}  # number -> signature of the row last written
        self.notes: list[str] = []  # rows that could not be told as they are

    def _open(self) -> optuna.Study:
        study = optuna.create_study(storage=self.storage, study_name=self.name, direction="maximize",
                                    load_if_exists=True)
        if "objective" not in study.user_attrs:  # a new study: opening an existing one writes nothing
            study.set_user_attr("objective", "validation HM with a base floor (penalised below it)")
        return study

    def sync(self, rows: list[dict[str, Any]]) -> optuna.Study:
        """Bring the stored study in step with ``rows`` (``TrialRecord.row()`` / trials.parquet).
        Only rows that changed since the last sync are looked at, so a sync during a long study
        costs what its new events cost."""
        rows = _numbered(rows)
        signatures = [_signature(row) for row in rows]
        if self.stored is None:
            self.stored = self.study.get_trials(deepcopy=False)
        changed = {n: self._frozen(row) for n, row in enumerate(rows) if self.seen.get(n) != signatures[n]}
        if len(self.stored) > len(rows) or any(_differs(self.stored[n], w) for n, w in changed.items()
                                               if n < len(self.stored)):
            return self._rewrite(rows)
        for n, want in sorted(changed.items()):
            if n >= len(self.stored):
                self.study.add_trial(want)
            elif self.stored[n].state == OptunaState.RUNNING:
                self._update(self.stored[n]._trial_id, self.stored[n], want)
            else:
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, n)
            self.stored[n:n + 1] = [self.storage.get_trial(trial_id)]
        self.seen.update({n: signatures[n] for n in changed})
        return self.study

    def _rewrite(self, rows: list[dict[str, Any]]) -> optuna.Study:
        """The stored study written again from ``rows``."""
        optuna.delete_study(study_name=self.name, storage=self.storage)
        self.study = self._open()
        self.study.add_trials([self._frozen(row) for row in rows])
        self.stored = self.study.get_trials(deepcopy=False)
        self.seen = {n: _signature(row) for n, row in enumerate(rows)}
        return self.study

    def _frozen(self, row: dict[str, Any]) -> FrozenTrial:
        try:
            return frozen_trial(row, self.dists)
        except (ValueError, KeyError) as exc:  # a hand-edited table or an older space
            self.notes.append(f"trial {row.get('number')}: told as failed, without values ({exc})")
            return create_trial(state=OptunaState.FAIL, user_attrs={"error": str(exc)})

    def _update(self, trial_id: int, have: FrozenTrial, want: FrozenTrial) -> None:
        """A RUNNING stored trial: its new epochs, attributes and, when it ended, its end."""
        for step, value in want.intermediate_values.items():
            if have.intermediate_values.get(step) != value:
                self.storage.set_trial_intermediate_value(trial_id, step, value)
        for key, value in want.user_attrs.items():
            if have.user_attrs.get(key) != value:
                self.storage.set_trial_user_attr(trial_id, key, value)
        if want.state != OptunaState.RUNNING:
            for key, value in want.system_attrs.items():  # the base-floor constraint
                self.storage.set_trial_system_attr(trial_id, key, value)
            self.storage.set_trial_state_values(trial_id, want.state, None if want.value is None else [want.value])

    def close(self) -> None:
        self.storage.engine.dispose()


def _numbered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in number order, up to the first missing number (a trial Ray created and has not
    started yet): Optuna numbers trials in the order they are added."""
    out: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: r["number"]):
        if int(row["number"]) != len(out):
            break
        out.append(row)
    return out


SIGNED = ("state", "params_json", "curve_json", "objective", "violation", "hm", "base_acc", "novel_acc",
          "trial_id", "is_default", "mlflow_run_id")  # what frozen_trial reads


def _signature(row: dict[str, Any]) -> str:
    return json.dumps([row.get(k) for k in SIGNED], default=str)  # NaN as "NaN": equal to itself


def _differs(have: FrozenTrial, want: FrozenTrial) -> bool:
    """Not the same trial: other values, or an end other than the one stored (a RUNNING stored
    trial may still end; a finished one cannot change)."""
    if have.params != want.params:
        return True
    if have.state == OptunaState.RUNNING:
        return False
    return have.state != want.state or have.value != want.value or have.constraints != want.constraints


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
