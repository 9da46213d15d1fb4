"""GPU plans on a Ray cluster with 8 logical GPUs (no real ones; trials fall back to the CPU) and 4
CPUs: trials run concurrently, CPUs bind so trials are spread over the GPUs rather than packed, and
the feature cache is filled by a Ray task holding a trial's GPU share, not by the driver."""
from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from gcs_tune.tune import cluster  # noqa: E402
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
                       resources={"gpus_per_trial": 0.25, "cpus_per_trial": 1, "max_concurrent": 4})  # not the TPE cap
    outcome = run_search(SearchOptions(space=str(space), gpus=8, storage=str(tmp_path / "s"), name="gpus",
                                       live=False, overrides={"schedule.epochs": 4}))
    info = outcome.info
    assert info.gpus == 8 and info.max_concurrent == 4  # min(8 / 0.25, 4 CPUs / 1)
    assert info.resources == {"cpu": 1, "gpu": 1.0}  # 4 trials on 8 GPUs: one GPU each, not four on one
    frame = read_table(outcome.study)
    assert len(frame) == TRIALS and set(frame["state"]) == {"complete"}
    intervals = list(zip(frame["started_at"], frame["ended_at"]))
    assert max_overlap(intervals) >= 2, intervals


@pytest.mark.parametrize("gpus, share, cpus, cap, want_share, want_concurrent, spread", [
    (8, 0.25, 1, None, 1.0, 4, True),  # 4 CPU slots, 32 GPU slots: spread one per GPU
    (8, 0.25, 0.25, None, 0.5, 16, True),  # 16 CPU slots on 8 GPUs: two per GPU
    (8, 0.25, 0.125, None, 0.25, 32, False),  # CPUs allow all 32 quarter-GPU slots
    (8, 0.25, 0.125, 8, 1.0, 8, True),  # max_concurrent binds the same way
    (2, 0.5, 1, None, 0.5, 4, False),  # GPUs bind: packing is what was asked for
])
def test_the_plan_spreads_trials_when_cpus_bind(ray_cluster, gpus, share, cpus, cap, want_share, want_concurrent, spread):
    plan = cluster.plan(gpus, share, cpus, cap)
    assert (plan.resources["gpu"], plan.max_concurrent, plan.spread) == (want_share, want_concurrent, spread)
    assert plan.max_concurrent * plan.resources["gpu"] <= gpus
    assert f"{want_concurrent} trial(s) at once" in plan.describe()


def test_the_cache_is_filled_by_a_ray_task_with_a_gpu_share(ray_cluster, fast_cfg):
    tree = fast_cfg(**{"data.views": 2}).to_dict()
    on_gpu = cluster.warm_caches([tree], None, {"cpu": 1, "gpu": 0.25})
    assert on_gpu[0].pid != os.getpid()  # accounted by Ray and released, never the driver's CUDA context
    on_cpu = cluster.warm_caches([tree], "cpu", {"cpu": 1})
    assert on_cpu[0].pid == os.getpid() and on_cpu[0].draws == 0  # CPU trials: the driver, cache already full
