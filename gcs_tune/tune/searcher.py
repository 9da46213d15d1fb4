"""Optuna through Ray Tune, told the truth about each trial.

Ray's ``OptunaSearch`` tells Optuna COMPLETE for every trial that ends without an error, with its
last value -- including trials ASHA stopped early -- and knows nothing of constraints. This
subclass, on every trial completion (called by Ray in the driver, once per trial, after the
trial's last result):

* sets the base-floor constraint with ``trial.set_constraint`` (Optuna 5; feasible when <= 0),
* tells trials that stopped before their last epoch without diverging as PRUNED,
* keeps a small YAML summary of the study (Optuna's best, states) for the tracker,
* hands Ray the space's values as the trial's config, in the user's terms (see ``SpaceSampler``).

How many trials run at once matters to TPE as much as the sampler's settings: see
:func:`default_concurrency`.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from gcs_tune.tune.optuna_study import CONSTRAINT
from gcs_tune.tune.space import Space, SpaceFile
from gcs_tune.tune.trial import TrialReport

log = logging.getLogger(__name__)


class ConstrainedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` + constraint + PRUNED state + a summary file at ``summary_path``."""

    def __init__(self, *args, summary_path: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.summary_path = summary_path

    def _suggest_from_define_by_run_func(self, func, ot_trial) -> dict:
        """Ray's version merges every value the function suggested into the config, which would
        add Optuna's unit positions (``beta2_u``); the space already returns every value, in the
        user's terms, and that alone is the trial's config."""
        return func(ot_trial)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Called by Ray for every epoch a trial reports: Optuna's intermediate value at step =
        epoch. A retried or resumed trial continues after its last checkpoint's epoch (epoch 1 if
        it has none); steps Optuna already has are skipped rather than reported twice."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        step = TrialReport.from_ray(result).epoch
        seen = self.__dict__.setdefault("_steps", {}).setdefault(trial_id, set())
        if step not in seen:
            seen.add(step)
            self._ot_trials[trial_id].report(float(result[self.metric]), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Called by Ray once per trial when it ends (finished, stopped, or failed after retries)."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        if result and not error and self.metric in result:
            report = TrialReport.from_ray(result)
            ot_trial.set_constraint(CONSTRAINT, report.violation)
            if report.pruned:
                self._tell(ot_trial, None, TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                self._write_summary()
                return None
        super().on_trial_complete(trial_id, result, error)
        self._write_summary()
        return None

    def _tell(self, ot_trial, value, state) -> None:
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as exc:  # noqa: BLE001 -- Ray's own on_trial_complete does the same
            log.warning("optuna could not be told about trial %s: %s", ot_trial.number, exc)

    def summary(self) -> dict:
        """Optuna's view of the study: counts by state and its best feasible trial."""
        study = self._ot_study
        states = {s.name.lower(): 0 for s in TrialState}
        for t in study.get_trials(deepcopy=False):
            states[t.state.name.lower()] += 1
        out: dict = {"states": {k: v for k, v in states.items() if v}, "best": None}
        try:
            best = study.best_trial
            params = self._space.from_optuna(best.params)  # user terms, as in trials.parquet
            out["best"] = {"number": best.number, "value": float(best.value), "params": _plain(params),
                           "constraints": _plain(best.constraints)}
        except ValueError:  # nothing complete, or nothing feasible yet
            pass
        return out

    def _write_summary(self) -> None:
        if not self.summary_path:
            return
        path = Path(self.summary_path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.summary(), sort_keys=False))
        os.replace(tmp, path)


def _plain(d: dict) -> dict:
    return {k: v.item() if hasattr(v, "item") else v for k, v in d.items()}


def build_searcher(space: Space, max_concurrent: int, summary_path: str | None) -> ConcurrencyLimiter:
    """Seeded TPE over the space's define-by-run function, the defaults enqueued first, inside a
    ``ConcurrencyLimiter`` (without it Ray starts trials one at a time)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = space.sampler()
    # Ray enqueues these as Optuna's params: a bound-naming parameter as its unit position
    defaults = [sampler.to_optuna(space.spec.defaults)] if space.spec.defaults else None
    searcher = ConstrainedOptunaSearch(space=sampler, metric="objective", mode="max",
                                       sampler=tpe_sampler(space.spec, max_concurrent), points_to_evaluate=defaults,
                                       summary_path=summary_path)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def tpe_sampler(spec: SpaceFile, max_concurrent: int) -> optuna.samplers.TPESampler:
    """The study's TPE, every choice spelled out (Optuna's defaults have changed between releases).

    * ``multivariate``: one joint density over the parameters, so beta2 is drawn knowing beta1
      (independent TPE fits one density per parameter and loses such interactions; Optuna's docs
      report it outperforming the independent TPE on single-objective problems).
    * ``group``: with ``when:`` parameters the space differs between trials; the multivariate TPE
      models only the parameters every trial has (the intersection search space) and draws the
      conditional ones independently. ``group`` splits the space into the sets of parameters
      that occur together and models each jointly (Optuna documents it for conditional spaces).
      Off otherwise: it adds nothing to a fixed space and is experimental.
    * ``constant_liar``: while trials run in parallel, the running ones count as bad results, so
      the next suggestion moves away from them instead of repeating a neighbour of a trial still
      training (Optuna's option for parallel and distributed TPE; no effect one at a time).
    """
    conditional = any(p.when for p in spec.params.values())
    with warnings.catch_warnings():  # group's ExperimentalWarning: chosen knowingly, not news to the user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup_trials(spec.trials),
                                          multivariate=True, group=conditional, constant_liar=max_concurrent > 1)


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the space: Optuna's 10, fewer for small budgets."""
    return max(2, min(10, trials // 3))


def default_concurrency(trials: int, startup: int) -> int:
    """Trials at once when the space does not say: TPE learns only from finished trials.

    With ``c`` trials at once, trial ``i`` (from 0) is suggested when about ``i - c + 1`` have
    finished, and Optuna's TPE samples at random until ``startup`` have finished (it counts
    complete and pruned trials). So the first ``startup + c - 1`` trials are random and the other
    ``trials - startup - c + 1`` are TPE's. The cap keeps both of:

    * at least half the budget TPE's: ``c <= trials // 2 - startup + 1``;
    * at least four rounds of the budget, ``c <= trials // 4``: when the last quarter of the
      trials is suggested, at least half the budget has finished, over twice as many trials as
      are still running.

    64 trials (10 random): 16 at once, 39 suggested by TPE (at 32 at once, 23). 16 trials: 4, 8.
    """
    return max(1, min(trials // 4, trials // 2 - startup + 1))


def concurrency_cap(spec: SpaceFile) -> int:
    """The space's ``resources.max_concurrent`` if it gives one, else :func:`default_concurrency`
    (the cluster's slots may bind lower still)."""
    if spec.resources.max_concurrent is not None:
        return spec.resources.max_concurrent
    return default_concurrency(spec.trials, startup_trials(spec.trials))
