"""The objective the search maximises: harmonic mean of base and novel accuracy, with a base floor.

Pure functions. Accuracies are percentages (0–100). Feasible runs score their HM (0–100);
infeasible runs (base below the floor) score −penalty·violation − (1 − HM/100), which is finite and
below every feasible value, and still ranks infeasible runs by how far they miss, then by HM.
NaN or inf accuracies (a diverged run) count as 0: nothing non-finite leaves this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gcs_tune.config import ObjectiveConfig


@dataclass(frozen=True)
class Score:
    value: float  # what the searcher maximises
    hm: float
    feasible: bool
    violation: float  # points of base accuracy below the floor, 0 when feasible
    floor: float | None


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def harmonic_mean(base: float, novel: float) -> float:
    base, novel = _finite(base), _finite(novel)
    return 0.0 if base + novel <= 0 else 2 * base * novel / (base + novel)


def resolve_floor(cfg: ObjectiveConfig, zero_shot_base: float | None) -> float | None:
    """The base-accuracy floor in percent, or None when there is none."""
    if cfg.floor == "none":
        return None
    if cfg.floor == "absolute":
        return cfg.value
    if cfg.floor == "zero_shot":
        if zero_shot_base is None:
            raise ValueError("objective.floor=zero_shot needs the zero-shot base accuracy")
        return max(0.0, zero_shot_base - cfg.tolerance)
    return max(0.0, cfg.value - cfg.tolerance)  # "reference": value is the reference run's base


def score(base: float, novel: float, floor: float | None, penalty: float = 1.0) -> Score:
    base, novel = _finite(base), _finite(novel)
    hm = harmonic_mean(base, novel)
    violation = 0.0 if floor is None else max(0.0, floor - base)
    if violation == 0.0:
        return Score(hm, hm, True, 0.0, floor)
    return Score(-penalty * violation - (1 - hm / 100), hm, False, violation, floor)


def worst(penalty: float = 1.0) -> Score:
    """What a diverged run reports: finite, and below every score ``score`` can give."""
    return Score(-penalty * 100.0 - 1.0, 0.0, False, 100.0, None)
