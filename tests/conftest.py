"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) on the CPU, on the lab data and the lab
model's architecture (random weights unless a test needs the trained lab)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GCS_TUNE_CHECKPOINT_EVERY_S", "0")  # every epoch: the fault tests resume mid-trial

import pytest  # noqa: E402
import yaml  # noqa: E402

from gcs_tune.config import load_config  # noqa: E402

SHARED_CACHE = Path(tempfile.gettempdir()) / "gcs_tune_test_features"  # shared by test modules; keyed, safe

FAST = {
    "backbone.model": "lab-vit-tiny",  # the lab architecture, random weights: fast, no checkpoint
    "schedule.epochs": 2,
    "data.views": 1,
    "data.shots": 4,
    "data.lab_test_per_class": 4,
}


@pytest.fixture
def fast_cfg(tmp_path):
    """A two-epoch run on the lab data that takes about a second."""
    def make(**overrides):
        return load_config(None, {**FAST, "data.cache_dir": str(tmp_path / "cache"), **overrides})
    return make


@pytest.fixture(scope="module")
def ray_cluster(request):
    """Ray started once per test module (it takes seconds and 0.7 GB). A module sets ``RAY_INIT``
    to ask for other resources, e.g. logical GPUs."""
    ray = pytest.importorskip("ray")
    resources = getattr(request.module, "RAY_INIT", {"num_cpus": 2})
    ray.init(**resources, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="gcs_ray_", dir="/tmp"))
    yield
    ray.shutdown()


def write_fast_space(tmp: Path, **top) -> Path:
    """A search space that trains in a second or two per trial on the lab."""
    tree = {
        "base": {"backbone": {"model": "lab"},
                 "data": {"dataset": "lab", "shots": 2, "views": 1, "lab_test_per_class": 4,
                          "cache_dir": str(SHARED_CACHE)},
                 "method": {"name": "gcscoop"}, "optim": {"batch_size": 32}, "schedule": {"epochs": 2}},
        "params": {"rho": {"key": "method.rho", "type": "loguniform", "low": 0.01, "high": 1.0},
                   "n_ctx": {"key": "prompt.n_ctx", "type": "choice", "values": [2, 4]},
                   "lr": {"key": "optim.lr", "type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "defaults": {"rho": 0.1, "n_ctx": 4, "lr": 0.002},
        "objective": {"floor": "reference", "tolerance": 1.0},
        "trials": 4, "scheduler": {"type": "fifo"},
        "resources": {"cpus_per_trial": 1}, "failure": {"max_failures": 1},
    }
    tree.update(top)
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def fast_space():
    """``fast_space(tmp, **top_level_overrides) -> path`` of a space YAML (see write_fast_space)."""
    return write_fast_space
