"""Ray: join or start a cluster, check it can run what is asked (before anything waits forever),
fill the feature cache once per node, and run one-off tasks (the CoOp reference) with a trial's
resources."""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from gcs_tune.config import ConfigError
from gcs_tune.prepare import Encoding

PASS_ENV = ("TORCH_HOME", "XDG_CACHE_HOME", "CUDA_LAUNCH_BLOCKING")
WARM_TIMEOUT_S = float(os.environ.get("GCS_TUNE_WARM_TIMEOUT_S", 4 * 3600))  # ImageNet's 200 draws take minutes


@dataclass(frozen=True)
class Plan:
    gpus: float  # GPUs the search uses (0: CPU trials)
    resources: dict[str, float]  # one trial's request, Tune's spelling: {"cpu": 1, "gpu": 0.25}
    max_concurrent: int
    nodes: int
    spread: bool = False  # the GPU share was raised so trials spread over every GPU

    def describe(self) -> str:
        """One line for the console before the search starts."""
        cpu = self.resources["cpu"]
        if self.gpus == 0:
            return f"{self.max_concurrent} CPU trial(s) at once ({cpu:g} CPU each, {self.nodes} node(s))"
        share = self.resources["gpu"]
        per_gpu = f"{round(1 / share)} per GPU" if share < 1 else f"{share:g} GPU(s) each"
        line = (f"{self.max_concurrent} trial(s) at once on {self.gpus:g} GPU(s), {per_gpu} "
                f"({share:g} GPU + {cpu:g} CPU per trial, {self.nodes} node(s))")
        if self.spread:
            line += ("; fewer trials at once than GPU slots (CPUs or max_concurrent bind), so the share was "
                     "raised to spread them evenly over every GPU instead of packing a few")
        return line


def connect(address: str | None, temp_dir: str | None = None, dashboard: bool = False) -> bool:
    """Join ``address`` ("auto", "host:port") or start a local Ray. True if this call started it
    (so the caller shuts it down); an already initialised Ray (tests, notebooks) is reused.

    ``dashboard``: start Ray's dashboard on loopback (the optional ``ray[default]`` extra) and
    print its address; without the extra installed that is a clear error, not a silent no-op."""
    if dashboard and importlib.util.find_spec("aiohttp_cors") is None:
        raise ConfigError("--dashboard needs Ray's dashboard: pip install -e '.[dashboard]' (ray[default])")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": dashboard, "log_to_driver": False, "configure_logging": True,
                              "logging_level": logging.WARNING}
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    if address:  # a running cluster's workers do not inherit this shell: pass what the trials need
        env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(("HF_", "GCS_TUNE_"))}
        context = ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    else:  # a private local cluster, with token auth (see gcs_tune/tune/__init__.py): only clients
        # holding its token (Ray writes it to ~/.ray/auth_token) may submit code to it
        context = ray.init(_temp_dir=temp_dir or os.environ.get("GCS_TUNE_RAY_TMP"), **kwargs)
        _private(Path.home() / ".ray" / "auth_token")
    if dashboard:
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    return True


def _private(path: Path) -> None:
    """Ray writes the token world-readable; on a shared host other users could then use it."""
    try:
        if path.is_file() and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
    except OSError:
        pass


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def plan(gpus: float | None, gpus_per_trial: float, cpus_per_trial: float, cap: int | None) -> Plan:
    """Trial resources and concurrency from what the cluster has; a clear error instead of a
    search that would wait forever for resources that do not exist.

    When CPUs, not GPUs, bound the number of trials at once, Ray would pack the fractional GPU
    requests best-fit onto the first GPUs and leave the others idle: the share is then raised to
    1/k with k = trials per GPU that the CPUs allow, so every GPU gets the same number of trials."""
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
    if gpus == 0:
        return Plan(0.0, {"cpu": cpus_per_trial}, min(by_cpu, cap or by_cpu), len(nodes))
    node_gpus = max(n["Resources"].get("GPU", 0.0) for n in nodes)
    if gpus_per_trial > node_gpus:
        raise ConfigError(f"resources.gpus_per_trial={gpus_per_trial:g} but the largest node has {node_gpus:g} GPUs")
    share, spread = gpus_per_trial, False
    by_gpu = max(1, math.floor(gpus / share + 1e-9))
    concurrent = min(by_gpu, by_cpu, cap or by_gpu)
    whole = math.floor(gpus + 1e-9)
    if share < 1 and whole >= 1 and concurrent < by_gpu:
        per_gpu = max(1, concurrent // whole)
        if 1 / per_gpu > share:
            share, spread = 1 / per_gpu, True
            concurrent = min(concurrent, per_gpu * whole)
    return Plan(gpus, {"cpu": cpus_per_trial, "gpu": share}, concurrent, len(nodes), spread)


def trial_nodes(resources: dict[str, float]) -> list[dict]:
    """Live nodes on which one trial fits (a CPU-only head node cannot run GPU trials)."""
    return [n for n in alive_nodes()
            if n["Resources"].get("CPU", 0.0) >= resources.get("cpu", 1)
            and n["Resources"].get("GPU", 0.0) >= resources.get("gpu", 0)]


def _warm_one_node(cfg_trees: list[dict], device: str | None, progress=None) -> list[Encoding]:
    from gcs_tune.config import build_config
    from gcs_tune.prepare import prepare

    overrides = {"backbone.device": device} if device else {}
    return [prepare(build_config(tree, overrides, source="<warm>"), progress).encoding for tree in cfg_trees]


def warm_caches(cfg_trees: list[dict], device: str | None, resources: dict[str, float], progress=None,
                timeout_s: float = WARM_TIMEOUT_S) -> list[Encoding]:
    """Compute every frozen feature the trials will read (eval splits and the training draws),
    once per node that can run trials, before the search, on the trials' device and precision.

    CPU trials on one node: in the driver, with a progress bar. Otherwise one Ray task per trial
    node with a trial's resources: the GPU it uses is accounted for and released when it ends (the
    driver never holds a CUDA context beside the trials). Returns what each node encoded."""
    nodes = trial_nodes(resources)
    if not nodes:
        raise ConfigError(f"no node of the Ray cluster can run a trial that asks for {resources} "
                          f"(nodes: {[n['Resources'] for n in alive_nodes()]})")
    if len(nodes) == 1 and not resources.get("gpu"):
        return _warm_one_node(cfg_trees, device, progress)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0), max_retries=0)(_warm_one_node)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(cfg_trees, device): n for n in nodes}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        late = ", ".join(refs[r].get("NodeManagerAddress", "?") for r in pending)
        raise ConfigError(f"filling the feature cache did not finish within {timeout_s:g} s on node(s) {late}; "
                          f"check that they can run a trial ({resources}), or raise GCS_TUNE_WARM_TIMEOUT_S")
    return [enc for ref in done for enc in ray.get(ref)]


def nodes_not_seeing(folder: str, timeout_s: float = 120.0) -> list[str]:
    """Addresses of the live nodes that cannot read a marker file the driver just wrote in
    ``folder``: a folder is shared when every node sees it, whatever its file system (several
    raylets on one host share a local disk; two hosts may not share an NFS path mounted on one)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(folder).mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    marker = Path(folder) / f".gcs_tune-shared-{token}"
    marker.write_text(token)
    try:
        check = ray.remote(num_cpus=0, max_retries=0)(_reads)
        refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token): n for n in alive_nodes()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        return [refs[r].get("NodeManagerAddress", "?") for r in refs if r not in ready or not ray.get(r)]
    finally:
        marker.unlink(missing_ok=True)


def _reads(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def run_task(fn, resources: dict[str, float], *args):
    """Run ``fn(*args)`` as a Ray task with one trial's resources; its return value."""
    task = ray.remote(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0), max_retries=0)(fn)
    return ray.get(task.remote(*args))
