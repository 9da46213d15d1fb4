"""Filling the feature cache on a two-node Ray cluster (two raylets on this machine, started as
Ray's own tests do): a CPU-only head, the usual layout, must not receive a GPU task that can never
be scheduled, and a warm-up that cannot finish ends with a message, not a wait forever."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from gcs_tune.config import ConfigError  # noqa: E402
from gcs_tune.tune import cluster  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_only_nodes_that_can_run_a_trial_are_warmed(two_nodes, fast_cfg):
    trial = {"cpu": 1, "gpu": 0.5}
    assert [n["Resources"].get("GPU") for n in cluster.trial_nodes(trial)] == [2.0]  # not the CPU-only head
    encodings = cluster.warm_caches([fast_cfg(**{"data.views": 1}).to_dict()], None, trial, timeout_s=300)
    assert len(encodings) == 1 and encodings[0].images == 128


def test_a_trial_no_node_can_run_is_refused_at_once(two_nodes, fast_cfg):
    with pytest.raises(ConfigError, match="no node of the Ray cluster can run a trial"):
        cluster.warm_caches([fast_cfg().to_dict()], None, {"cpu": 1, "gpu": 4})


def test_a_warm_up_that_does_not_finish_in_time_says_so(two_nodes, fast_cfg):
    with pytest.raises(ConfigError, match="did not finish within 0.01 s"):
        cluster.warm_caches([fast_cfg(**{"data.views": 3}).to_dict()], None, {"cpu": 1, "gpu": 0.5}, timeout_s=0.01)


def test_a_folder_every_node_sees_is_shared_storage(two_nodes, tmp_path):
    """Shared means seen by every node (a marker file read by a task on each), not a file-system
    type: two raylets on one host share a local disk, so a multi-node study may use it."""
    from gcs_tune.tune.runner import _check_cluster

    assert cluster.nodes_not_seeing(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []  # the marker is gone
    plan = cluster.Plan(gpus=0, resources={"cpu": 1}, max_concurrent=2, nodes=2)
    _check_cluster(plan, str(tmp_path), "http://127.0.0.1:5000")
    with pytest.raises(ConfigError, match="MLflow server"):
        _check_cluster(plan, str(tmp_path), f"sqlite:///{tmp_path}/mlflow.db")


def test_storage_a_node_cannot_see_is_refused_by_name(two_nodes, tmp_path, monkeypatch):
    from gcs_tune.tune.runner import _check_cluster

    # One host cannot hide a folder from one of its raylets: the check's answer is stood in for.
    monkeypatch.setattr(cluster, "nodes_not_seeing", lambda folder: ["10.0.0.7"])
    plan = cluster.Plan(gpus=0, resources={"cpu": 1}, max_concurrent=2, nodes=2)
    with pytest.raises(ConfigError, match=r"not shared: node\(s\) 10.0.0.7 cannot see it"):
        _check_cluster(plan, str(tmp_path), "http://127.0.0.1:5000")
    _check_cluster(plan, "s3://bucket/searches", "http://127.0.0.1:5000")  # object stores are shared
