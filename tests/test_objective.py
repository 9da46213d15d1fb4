import math

from gcs_tune.config import ObjectiveConfig
from gcs_tune.objective import harmonic_mean, resolve_floor, score, worst


def test_harmonic_mean():
    assert harmonic_mean(80, 60) == 2 * 80 * 60 / 140
    assert harmonic_mean(0, 0) == 0
    assert harmonic_mean(float("nan"), 50) == 0


def test_floor_kinds():
    assert resolve_floor(ObjectiveConfig(floor="none"), 50) is None
    assert resolve_floor(ObjectiveConfig(floor="absolute", value=70), 50) == 70
    assert resolve_floor(ObjectiveConfig(floor="zero_shot", tolerance=2), 50) == 48
    assert resolve_floor(ObjectiveConfig(floor="reference", value=90, tolerance=1.5), 50) == 88.5


def test_infeasible_is_finite_and_below_every_feasible_value():
    feasible_low = score(60.0, 0.0, floor=60.0)  # HM 0, but feasible
    assert feasible_low.feasible and feasible_low.value == 0
    barely = score(59.99, 99.0, floor=60.0)
    far = score(10.0, 99.0, floor=60.0)
    assert not barely.feasible and barely.value < feasible_low.value
    assert far.value < barely.value  # more violation ranks lower
    assert math.isclose(barely.violation, 0.01, abs_tol=1e-9)
    for s in (score(float("nan"), float("inf"), 50.0, 5.0), worst(5.0)):
        assert math.isfinite(s.value) and not s.feasible
    assert worst(5.0).value <= score(0.0, 0.0, 100.0, 5.0).value
