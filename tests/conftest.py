"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) on the CPU, on the lab data and the lab
model's architecture (random weights unless a test needs the trained lab)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from gcs_tune.config import load_config  # noqa: E402

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
