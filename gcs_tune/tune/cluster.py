"""Ray: join or start a cluster, check it can run what is asked (before anything waits forever),
fill the feature cache once per node, and run one-off tasks (the CoOp reference) with a trial's
resources."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import ray

from gcs_tune.config import ConfigError

PASS_ENV = ("TORCH_HOME", "XDG_CACHE_HOME", "CUDA_LAUNCH_BLOCKING")


@dataclass(frozen=True)
class Plan:
    gpus: float  # GPUs the search uses (0: CPU trials)
    resources: dict[str, float]  # one trial's request, Tune's spelling: {"cpu": 1, "gpu": 0.25}
    max_concurrent: int
    nodes: int


def connect(address: str | None, temp_dir: str | None = None) -> bool:
    """Join ``address`` ("auto", "host:port") or start a local Ray. True if this call started it
    (so the caller shuts it down); an already initialised Ray (tests, notebooks) is reused."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
                              "logging_level": logging.WARNING}
    if address:  # a running cluster's workers do not inherit this shell: pass what the trials need
        env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(("HF_", "GCS_TUNE_"))}
        ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    else:  # a private local cluster: no token (joining one uses the cluster's token, if it has one)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(_temp_dir=temp_dir or os.environ.get("GCS_TUNE_RAY_TMP"), **kwargs)
    return True


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def plan(gpus: float | None, gpus_per_trial: float, cpus_per_trial: float, cap: int | None) -> Plan:
    """Trial resources and concurrency from what the cluster has; a clear error instead of a
    search that would wait forever for resources that do not exist."""
    total = ray.cluster_resources()
    have_gpus, have_cpus = float(total.get("GPU", 0.0)), float(total.get("CPU", 0.0))
    nodes = alive_nodes()
    gpus = have_gpus if gpus is None else float(gpus)
    if gpus > have_gpus:
        raise ConfigError(f"--gpus {gpus:g}: the Ray cluster has {have_gpus:g} GPU(s) "
                          f"({len(nodes)} node(s), {have_cpus:g} CPUs); ask for at most {have_gpus:g}, "
                          f"or --gpus 0 for CPU trials")
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=have_cpus)
    if cpus_per_trial > node_cpus:
        raise ConfigError(f"resources.cpus_per_trial={cpus_per_trial:g} but the largest node has {node_cpus:g} CPUs")
    by_cpu = max(1, math.floor(have_cpus / cpus_per_trial + 1e-9))
    if gpus > 0:
        node_gpus = max(n["Resources"].get("GPU", 0.0) for n in nodes)
        if gpus_per_trial > node_gpus:
            raise ConfigError(f"resources.gpus_per_trial={gpus_per_trial:g} but the largest node has {node_gpus:g} GPUs")
        by_gpu = max(1, math.floor(gpus / gpus_per_trial + 1e-9))
        resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        concurrent = min(by_gpu, by_cpu)
    else:
        resources, concurrent = {"cpu": cpus_per_trial}, by_cpu
    if cap:
        concurrent = min(concurrent, cap)
    return Plan(gpus, resources, concurrent, len(nodes))


def _warm_one_node(cfg_trees: list[dict], device: str | None, progress=None) -> str:
    from gcs_tune.config import build_config
    from gcs_tune.prepare import prepare

    overrides = {"backbone.device": device} if device else {}
    for tree in cfg_trees:
        prepare(build_config(tree, overrides, source="<warm>"), progress)
    return ray.util.get_node_ip_address()


def warm_caches(cfg_trees: list[dict], device: str | None, resources: dict[str, float], progress=None) -> None:
    """Compute every frozen feature the trials will read, once per node, before the search, on the
    trials' device (``device`` as theirs; with a GPU share the features are bf16 there).

    One node: in the driver (with a progress bar). Several: one pinned task per node with a
    trial's resources, so no two trials of a node race to encode the same split."""
    nodes = alive_nodes()
    if len(nodes) <= 1:
        _warm_one_node(cfg_trees, device, progress)
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0))(_warm_one_node)
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
             .remote(cfg_trees, device) for n in nodes])


def run_task(fn, resources: dict[str, float], *args):
    """Run ``fn(*args)`` as a Ray task with one trial's resources; its return value."""
    task = ray.remote(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0), max_retries=0)(fn)
    return ray.get(task.remote(*args))
