"""Search spaces as YAML: the file's schema and sampling through Optuna (loading and checking a
file before Ray starts: ``gcs_tune.tune.validate.load_space``).

A space file names the base run config, the parameters to search (each mapped onto a dotted run
config key under a stable short name), the paper defaults enqueued as the first trial, the
objective and its base floor, the trial budget, the scheduler and the resources of a trial::

    base_config: null                 # optional run config YAML, relative to this file
    base: {schedule: {epochs: 50}}    # run config sections applied over it
    params:
      rho:   {key: method.rho, type: loguniform, low: 1.0e-3, high: 10.0}
      beta1: {key: method.beta1, type: uniform, low: 0.0, high: 0.9}
      beta2: {key: method.beta2, type: uniform, low: beta1, high: 1.0}   # bound = another param
      n_ctx: {key: prompt.n_ctx, type: choice, values: [2, 4, 8, 16]}
      kg:    {key: method.kg_weight, type: uniform, low: 1, high: 10, when: {method: [kgcoop]}}
    defaults: {rho: 0.1, beta1: 0.5, beta2: 0.8, n_ctx: 4}
    objective: {floor: reference, tolerance: 1.0}
    trials: 64
    scheduler: {type: asha, grace_period: 5, reduction_factor: 3}
    resources: {gpus_per_trial: 0.25, cpus_per_trial: 2}

A parameter whose bound names another one (``beta2`` above) is given to Optuna as its position
``beta2_u`` in [0, 1] between the bounds (see :class:`SpaceSampler`): a fixed distribution, so the
multivariate TPE models it jointly with ``beta1``. Everything outside the searcher's own study --
the trial configs, the results table, MLflow -- sees ``beta2`` itself.

"""
from __future__ import annotations

import math
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gcs_tune.config import RunConfig

Bound = Union[float, str]  # a number, or the short name of an earlier numeric parameter
Scalar = Union[bool, int, float, str, None]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_MISSING = object()


class Param(_Model):
    key: str  # dotted run config key, e.g. method.rho
    type: Literal["loguniform", "uniform", "int", "choice"]
    low: Bound | None = None
    high: Bound | None = None
    step: float | None = Field(None, gt=0)  # uniform / int only
    log: bool = False  # int only
    values: list[Scalar] | None = None  # choice only
    when: dict[str, list[Scalar]] | None = None  # active only if each named param takes one of the values

    @model_validator(mode="after")
    def _check(self) -> "Param":
        if self.type == "choice":
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("choice takes values, not low/high/step")
            if not self.values:
                raise ValueError("choice needs a non-empty list of values")
            if len(set(map(repr, self.values))) != len(self.values):
                raise ValueError("choice values must be distinct")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low/high, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high")
        if self.type == "loguniform" and self.step is not None:
            raise ValueError("loguniform takes no step")
        if self.log and self.type != "int":
            raise ValueError("log is for int only (use type: loguniform)")
        if self.log and self.dependent:  # a log grid between moving bounds has no natural unit position
            raise ValueError("an int with log: true needs numeric low and high, not a bound naming another "
                             "parameter (drop log, or use type: loguniform)")
        if self.type == "int":
            for b in (self.low, self.high):
                if not isinstance(b, str) and float(b) != int(b):
                    raise ValueError(f"int bounds must be integers, got {b}")
        lo, hi = self.low, self.high
        if not isinstance(lo, str) and not isinstance(hi, str):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("bounds must be finite")
            if lo > hi or (lo == hi and self.type != "int"):
                raise ValueError(f"empty range: low {lo} >= high {hi}")
            if self.type == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs low > 0, got {lo}")
        return self

    @property
    def dependent(self) -> bool:
        """A bound names another parameter: Optuna samples the unit position ``<name>_u`` instead."""
        return isinstance(self.low, str) or isinstance(self.high, str)

    def active(self, values: dict[str, Any]) -> bool:
        """Whether this parameter exists, given the values of the earlier ones (``when``)."""
        return not self.when or all(values.get(k, _MISSING) in allowed for k, allowed in self.when.items())

    def bounds(self, values: dict[str, Any]) -> tuple[Any, Any]:
        """(low, high), a bound that names an earlier parameter taking that parameter's value."""
        return tuple(values[b] if isinstance(b, str) else b for b in (self.low, self.high))

    def numeric_range(self, ranges: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
        """(smallest, largest) value this parameter can take, given the earlier params' ranges."""
        if self.type == "choice":
            nums = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            return (min(nums), max(nums)) if len(nums) == len(self.values) else None
        lo = ranges[self.low][0] if isinstance(self.low, str) else float(self.low)
        hi = ranges[self.high][1] if isinstance(self.high, str) else float(self.high)
        return lo, hi


class Scheduler(_Model):
    type: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs all its epochs
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(3.0, gt=1)


class Resources(_Model):
    gpus_per_trial: float = Field(1.0, gt=0)  # used when the search has GPUs; 1, 1/2, 1/3, 1/4 pack a GPU
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent: int | None = Field(None, ge=1)  # extra cap on trials at once

    @model_validator(mode="after")
    def _check(self) -> "Resources":
        g = self.gpus_per_trial
        if g > 1 and g != int(g):
            raise ValueError(f"gpus_per_trial above 1 must be whole, got {g}")
        return self


class Failure(_Model):
    max_failures: int = Field(1, ge=0)  # retries of a trial that raised, then it is recorded failed


class SpaceFile(_Model):
    description: str = ""
    base_config: str | None = None
    base: dict[str, Any] = {}
    params: dict[str, Param]
    defaults: dict[str, Scalar] | None = None
    objective: dict[str, Any] = {}
    trials: int = Field(16, ge=1)
    seed: int = 0  # seeds the TPE sampler
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    failure: Failure = Failure()
    # Score each trial as the mean over this many seeds (seed, seed+1, ...): for when the seed
    # spread is larger than the effect being searched for. Costs that many trainings per trial.
    seeds_per_trial: int = Field(1, ge=1)

    def keys(self) -> dict[str, str]:
        """Short name -> dotted run config key."""
        return {name: p.key for name, p in self.params.items()}


class Space:
    """A validated space: the file's settings plus the resolved base :class:`RunConfig`."""

    def __init__(self, spec: SpaceFile, base: RunConfig, source: str, text: str, needs_reference: bool = False):
        self.spec, self.base, self.source, self.text = spec, base, source, text
        self.needs_reference = needs_reference  # floor=reference and no value given: run CoOp first

    @property
    def params(self) -> dict[str, Param]:
        return self.spec.params

    def keys(self) -> dict[str, str]:
        return self.spec.keys()

    def apply(self, values: dict[str, Any]) -> RunConfig:
        """The run config of a trial: the base with the sampled ``values`` (inactive ones absent)."""
        return apply_values(self.keys(), self.base, values)

    def sampler(self) -> "SpaceSampler":
        return SpaceSampler(self.spec.params, self.spec.defaults)


class SpaceSampler:
    """Optuna define-by-run function: suggests every active parameter, in file order, and returns
    the values in the user's terms.

    A parameter with a bound naming another parameter is suggested as ``<name>_u`` in [0, 1] and
    mapped between its bounds. Suggesting it directly, ``suggest_float("beta2", beta1, 1)``, gives
    a distribution that changes with every trial; Optuna's intersection search space drops such a
    parameter, and the multivariate TPE then samples it independently of the bound it depends on.

    ``defaults`` (user terms) come back exactly from the positions :meth:`to_optuna` gives them: a
    default trial is recognised by equality with the defaults, and ``lo + u * (hi - lo)`` can miss
    the default by an ulp (beta1 = 0.2, beta2 = 0.9 is u = 0.8749999999999999, which maps back to
    0.8999999999999999).

    A plain class (not a closure) because Ray pickles the searcher, this included, with the
    standard ``pickle`` when it saves the experiment state."""

    defaults: dict[str, Any] = {}  # read only; the fallback of a searcher pickled before it had them

    def __init__(self, params: dict[str, Param], defaults: dict[str, Any] | None = None):
        self.params = dict(params)
        self.defaults = dict(defaults or {})

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, p in self.params.items():
            if p.active(values):
                values[name] = self._suggest(trial, name, p, values)
        return values

    def to_optuna(self, values: dict[str, Any]) -> dict[str, Any]:
        """Optuna's parameters for the user's ``values`` (to enqueue them, or for a ``FixedTrial``)."""
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if name not in values:
                continue
            if p.dependent:
                out[unit_name(name)] = _to_unit(p, values[name], *p.bounds(values))
            else:
                out[name] = values[name]
        return out

    def from_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        """The user's values of an Optuna trial's ``params`` (the inverse of :meth:`to_optuna`)."""
        from optuna.trial import FixedTrial  # late: the space loads without Optuna's import time

        return self(FixedTrial(params))

    def _suggest(self, trial, name: str, p: Param, values: dict[str, Any]):
        if not p.dependent:
            return _suggest(trial, name, p, values)
        lo, hi = p.bounds(values)
        u = trial.suggest_float(unit_name(name), 0.0, 1.0)
        if name in self.defaults and u == _to_unit(p, self.defaults[name], lo, hi):
            return self.defaults[name]
        return _from_unit(p, u, lo, hi)


def unit_name(name: str) -> str:
    """Optuna's name for a parameter whose bound names another one: its position in [0, 1]."""
    return f"{name}_u"


def apply_values(keys: dict[str, str], base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``base`` with each searched value under its run config key (``keys``: short name -> dotted
    key): the one place where searched values become a run config (validation, trials, verdict)."""
    return base.replace(**{keys[n]: v for n, v in values.items() if n in keys})


def _suggest(trial, name: str, p: Param, values: dict[str, Any]):
    if p.type == "choice":
        return trial.suggest_categorical(name, p.values)
    lo, hi = p.bounds(values)
    if p.type == "int":
        return trial.suggest_int(name, int(math.ceil(lo)), int(math.floor(hi)), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, float(lo), float(hi), log=p.type == "loguniform", step=p.step)


def _grid(p: Param, lo: float, hi: float) -> tuple[float, int] | None:
    """(first point, number of steps) of an int or stepped parameter on [lo, hi], as Optuna's
    suggest_int / suggest_float(step=) lay it out: from low, high rounded down onto the grid."""
    if p.type != "int" and p.step is None:
        return None
    step = p.step or 1
    if p.type == "int":
        lo, hi = math.ceil(lo), math.floor(hi)
    n = math.floor((hi - lo) / step + 1e-9)
    if n < 0:
        raise ValueError(f"empty range [{lo}, {hi}]")
    return lo, n


def _from_unit(p: Param, u: float, lo: float, hi: float) -> float | int:
    """The value at position ``u`` in [0, 1] between ``lo`` and ``hi``: uniform in u means
    uniform in the value (in its log for loguniform; each grid point an equal share of [0, 1])."""
    grid = _grid(p, lo, hi)
    if grid is not None:
        first, n = grid
        value = first + min(n, math.floor(u * (n + 1))) * (p.step or 1)
        return int(value) if p.type == "int" else min(float(value), hi)
    if p.type == "loguniform":
        value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    else:
        value = lo + u * (hi - lo)
    return min(max(value, lo), hi)  # rounding must not leave the range the bounds promise


def _to_unit(p: Param, value: float, lo: float, hi: float) -> float:
    """The position of ``value`` (the inverse of :func:`_from_unit`; a grid point's middle)."""
    grid = _grid(p, lo, hi)
    if grid is not None:
        first, n = grid
        return (round((value - first) / (p.step or 1)) + 0.5) / (n + 1)
    if p.type == "loguniform":
        lo, hi, value = math.log(lo), math.log(hi), math.log(value)
    return (value - lo) / (hi - lo) if hi > lo else 0.0
