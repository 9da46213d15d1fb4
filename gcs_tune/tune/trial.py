"""The trial model, without Ray: what a trial reports each epoch (``TrialReport``: the one place metric
names are spelled, for Ray, Parquet and MLflow alike) and the state it is in (``TrialState``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class TrialState(StrEnum):
    """A str: Parquet columns and MLflow tags hold the value, and old tables load as they are."""

    RUNNING = "running"
    COMPLETE = "complete"  # ran all its epochs
    PRUNED = "pruned"  # stopped early by the scheduler
    DIVERGED = "diverged"  # loss went NaN/inf: reported a finite worst objective
    FAILED = "failed"  # raised, retries exhausted


TERMINAL = tuple(s for s in TrialState if s is not TrialState.RUNNING)
RAY_KEYS = ("training_iteration", "timestamp", "pid", "time_this_iter_s", "time_total_s", "time_since_restore",
            "iterations_since_restore")  # numbers Ray adds to every result
TABLE_COLUMNS = ("base_acc", "novel_acc", "hm", "objective", "feasible", "violation", "base_acc_se", "novel_acc_se",
                 "hm_seed_std", "test_base_acc", "test_novel_acc", "test_hm")  # the last report's, in trials.parquet
_NOT_LOGGED = ("epoch", "epochs", "started_at", "floor", "seeds")  # not MLflow metrics (epoch is their step)


@dataclass(frozen=True)
class TrialReport:
    """One epoch of a trial (the mean over its seeds); a float not reported is NaN. A report sent
    has a finite objective, hm, base_acc, novel_acc and violation (see ``trainable.epoch_metrics``)."""

    epoch: int = 0  # 1-based
    epochs: int = 0  # planned
    objective: float = math.nan  # validation HM, penalised below the base floor
    hm: float = math.nan
    base_acc: float = math.nan
    novel_acc: float = math.nan
    feasible: bool = False  # base accuracy at or above the floor
    violation: float = math.nan  # points of base accuracy below the floor (<= 0: feasible)
    diverged: bool = False
    train_loss: float = math.nan
    lr: float = math.nan
    epoch_seconds: float = math.nan
    started_at: float = math.nan  # unix time the trial's attempt started training
    base_acc_se: float = math.nan  # binomial standard errors of the validation accuracies
    novel_acc_se: float = math.nan
    floor: float = math.nan
    test_base_acc: float = math.nan  # the last epoch's, when the protocol measures the test split
    test_novel_acc: float = math.nan
    test_hm: float = math.nan
    hm_seed_std: float = math.nan  # multi-seed trials: the seeds' spread of HM
    seeds: int | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)  # open-ended, e.g. GCSAM's frac_* and mean_cos

    @property
    def pruned(self) -> bool:
        """Stopped before its last epoch without diverging: the scheduler stopped it."""
        return not self.diverged and self.epoch < self.epochs

    @property
    def final_state(self) -> TrialState:
        """The state of a trial that ended, without an error, on this report."""
        return TrialState.DIVERGED if self.diverged else TrialState.PRUNED if self.pruned else TrialState.COMPLETE

    def to_ray(self) -> dict[str, float]:
        """Finite floats only, flags as 0/1 (Ray's schedulers and searchers need numbers)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "diagnostics"}
        return {k: float(v) for k, v in {**out, **self.diagnostics}.items() if v is not None and math.isfinite(v)}

    @classmethod
    def from_ray(cls, result: dict[str, Any]) -> TrialReport:
        """A result as Ray hands it back (or a table row's numbers); Ray's own keys are ignored,
        every other number that is not a field is a diagnostic."""
        nums = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and k not in RAY_KEYS}
        own = {f.name: nums.pop(f.name) for f in fields(cls) if f.name in nums}
        own.update({k: int(own[k]) for k in ("epoch", "epochs", "seeds") if k in own})
        own.update({k: own[k] >= 0.5 for k in ("feasible", "diverged") if k in own})
        return cls(**own, diagnostics=nums)

    def logged(self) -> dict[str, float]:
        """What MLflow logs at step ``epoch``: the numbers measured (the test ones at the last epoch)."""
        return {k: v for k, v in self.to_ray().items() if k not in _NOT_LOGGED}
