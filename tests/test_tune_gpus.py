"""Fractional GPUs pack several trials at once: a Ray cluster with 8 logical GPUs (no real ones;
the trials fall back to the CPU) and ``gpus_per_trial: 0.25`` must run trials concurrently, each
asking Ray for a quarter GPU."""
from __future__ import annotations


import pytest

ray = pytest.importorskip("ray")

from gcs_tune.tune.results import read_table  # noqa: E402
from gcs_tune.tune.runner import SearchOptions, run_search  # noqa: E402

TRIALS = 4
RAY_INIT = {"num_cpus": 4, "num_gpus": 8}  # logical GPUs: read by the ray_cluster fixture


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    live = best = 0
    for _, step in events:
        live += step
        best = max(best, live)
    return best


def test_quarter_gpus_run_trials_at_once(ray_cluster, tmp_path, fast_space):
    space = fast_space(tmp_path, trials=TRIALS, objective={"floor": "none"},
                       resources={"gpus_per_trial": 0.25, "cpus_per_trial": 1})
    outcome = run_search(SearchOptions(space=str(space), gpus=8, storage=str(tmp_path / "s"), name="gpus",
                                       live=False, overrides={"schedule.epochs": 4}))
    info = outcome.info
    assert info.gpus == 8 and info.resources == {"cpu": 1, "gpu": 0.25}
    assert info.max_concurrent == 4  # min(8 / 0.25, 4 CPUs / 1)
    frame = read_table(outcome.study)
    assert len(frame) == TRIALS and set(frame["state"]) == {"complete"}
    intervals = list(zip(frame["started_at"], frame["ended_at"]))
    assert max_overlap(intervals) >= 2, intervals
