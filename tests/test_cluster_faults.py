"""A study on a real two-node Ray cluster (two raylets on loopback, started as Ray's own tests do)
logging to a real ``mlflow server`` process, with faults injected while trials run:

* the worker node is removed mid-study: its trial is retried on the head from its last per-epoch
  checkpoint, and every trial's final numbers equal an uninterrupted run of its config and seed;
* the MLflow server is down for 20 s mid-study (the trials sharing logical GPUs, half each): trials
  keep training, logging retries, and every child run still has exactly one value per epoch;
* the driver is SIGKILLed mid-study: ``--resume`` finishes it.

Every trial is counted once, under one number, in the Optuna storage, the Parquet table and
MLflow. Slow (a minute or two each)."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from gcs_tune import search  # noqa: E402
from gcs_tune.engine import fit  # noqa: E402
from gcs_tune.tune.results import read_table, trial_params  # noqa: E402
from gcs_tune.tune.space import apply_values  # noqa: E402
from gcs_tune.tune.validate import load_space  # noqa: E402
from gcs_tune.tune.study import StudyDir, StudyInfo  # noqa: E402
from gcs_tune.tune.trial import TERMINAL  # noqa: E402

pytestmark = pytest.mark.slow
TRIALS, EPOCHS = 4, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on loopback, as the README tells a cluster user to start it."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer /health in {timeout:g} s; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            import os
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash, workers included (SIGTERM drains for long)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    root = Path(tempfile.mkdtemp(prefix="gcs_mlflow_"))
    srv = MlflowServer(root)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def two_nodes(request):
    """A head with 1 CPU and a worker with 1 CPU, or (parametrized with a GPU count) a worker with
    2 CPUs and that many logical GPUs, where fractional GPU trials can only go."""
    gpus = getattr(request, "param", 0)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    worker = nodes.add_node(num_cpus=2 if gpus else 1, num_gpus=gpus)
    nodes.wait_for_nodes()
    yield nodes, worker
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


def space_file(tmp_path, fast_space, gpus_per_trial: float | None = None):
    share = {"gpus_per_trial": gpus_per_trial} if gpus_per_trial else {}  # used with --gpus > 0 only
    return fast_space(tmp_path, trials=TRIALS, objective={"floor": "zero_shot", "tolerance": 5.0},
                      resources={"cpus_per_trial": 1, "max_concurrent": 2, **share},  # CPU trials: one per node
                      base={"backbone": {"model": "lab"},
                            "data": {"dataset": "lab", "shots": 8, "views": 1, "lab_test_per_class": 4,
                                     "cache_dir": str(tmp_path / "cache")},
                            "method": {"name": "gcscoop"}, "optim": {"batch_size": 16},
                            "schedule": {"epochs": EPOCHS}})


def watch(study: StudyDir, stop: threading.Event, when, act) -> threading.Thread:
    """Call ``act()`` once ``when(study)`` holds, from a thread, while the search runs."""
    def loop():
        while not stop.is_set():
            if when(study):
                act()
                return
            time.sleep(0.2)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def checkpointed(study: StudyDir) -> bool:
    """Two trials -- one per node -- have saved a per-epoch checkpoint and none has finished: the
    trials on both nodes are mid-run."""
    done = (study.local / "trials.parquet").exists() and read_table(study)["state"].isin(TERMINAL).any()
    return not done and len({p.parent for p in study.local.glob("trial_*/checkpoint_*")}) >= 2


def run_study(tmp_path, fast_space, address, tracking, name, fault, gpus: float = 0) -> StudyDir:
    storage = str(tmp_path / "shared")  # one folder both raylets see: shared storage
    study, stop = StudyDir(storage, name), threading.Event()
    thread = watch(study, stop, *fault)
    space = space_file(tmp_path, fast_space, gpus_per_trial=0.5 if gpus else None)
    try:
        code = search.main(["--space", str(space), "--gpus", f"{gpus:g}", "--address", address,
                            "--storage", storage, "--tracking-uri", tracking, "--name", name, "--quiet"])
    finally:
        stop.set()
        thread.join()
    assert code == 0
    return study


def stored_optuna(study: StudyDir) -> list:
    """The study's Optuna storage as optuna-dashboard reads it."""
    import optuna
    return optuna.load_study(study_name=study.name, storage=f"sqlite:///{study.local / 'optuna.db'}").get_trials()


def assert_counted_once(study: StudyDir) -> None:
    frame = read_table(study).sort_values("number")
    assert len(frame) == TRIALS and frame["trial_id"].is_unique and frame["state"].isin(TERMINAL).all()
    assert frame["number"].tolist() == list(range(TRIALS))
    stored = stored_optuna(study)  # the same trials under the same numbers, each ended
    assert [(t.number, t.user_attrs["ray_trial_id"]) for t in stored] == list(zip(frame["number"], frame["trial_id"]))
    assert all(t.state.is_finished() for t in stored)
    info = StudyInfo.load(study)
    client = MlflowClient(info.tracking_uri)
    exp = client.get_experiment_by_name(info.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == info.parent_run_id]
    assert sorted(r.data.tags["gcs_tune.trial_id"] for r in children) == sorted(frame["trial_id"]), [
        (r.data.tags["gcs_tune.trial_id"], r.info.run_name, r.info.status, r.info.start_time, r.info.run_id)
        for r in children]
    for run in children:  # one value per epoch reached, none twice, none lost
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "objective")]
        assert steps == list(range(1, len(steps) + 1)), f"{run.info.run_name}: {steps}"
        assert run.info.status == "FINISHED"


def test_a_trial_on_a_removed_node_continues_elsewhere_from_its_checkpoint(two_nodes, server, tmp_path, fast_space):
    nodes, worker = two_nodes
    study = run_study(tmp_path, fast_space, nodes.address, server.uri, "node-lost",
                      (checkpointed, lambda: nodes.remove_node(worker)))
    assert_counted_once(study)
    frame = read_table(study)
    assert (frame["state"] == "complete").all()  # FIFO: all ran to the end ...
    assert frame["failures"].sum() >= 1  # ... the one on the lost node after a retry on the head
    space = load_space(study.local / "space.yaml", {"objective.floor": "zero_shot"})
    info = StudyInfo.load(study)
    for row in frame.to_dict("records"):  # each equals an uninterrupted run of its config and seed
        cfg = apply_values(space.keys(), info.base_config(), trial_params(row)).replace(**{"backbone.device": "cpu"})
        last = list(fit(cfg))[-1]
        assert row["base_acc"] == pytest.approx(last.val.base, abs=1e-6)
        assert row["novel_acc"] == pytest.approx(last.val.novel, abs=1e-6)


@pytest.mark.parametrize("two_nodes", [4], indirect=True)
def test_trials_keep_training_while_the_mlflow_server_is_down(two_nodes, server, tmp_path, fast_space):
    """Also fractional GPUs on a cluster: ``--gpus 1`` with half a GPU per trial, on a worker with
    4 logical GPUs (the head has none), so the two trials at a time share one GPU."""
    nodes, _ = two_nodes
    outage = {}

    def down_for_20_s():
        server.stop()
        outage["stopped"] = time.time()
        time.sleep(20)
        server.start()
        outage["back"] = time.time()

    study = run_study(tmp_path, fast_space, nodes.address, server.uri, "server-down", (checkpointed, down_for_20_s),
                      gpus=1)
    assert StudyInfo.load(study).resources == {"cpu": 1.0, "gpu": 0.5}
    assert outage["back"] - outage["stopped"] >= 20
    frame = read_table(study)
    during = (frame["ended_at"] > outage["stopped"]) & (frame["ended_at"] < outage["back"])
    assert during.any()  # trials went on training, and finishing, while the server was down
    spans = sorted(zip(frame["started_at"], frame["ended_at"]))
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # two at once on one GPU
    assert_counted_once(study)  # ... and every epoch reached MLflow once the server was back


def test_a_driver_killed_mid_study_is_finished_by_resume(two_nodes, server, tmp_path, fast_space):
    """SIGKILL, not Ctrl-C: nothing in the driver gets to save. ``--resume`` then finishes the study
    from Ray's last experiment snapshot and the per-epoch checkpoints: completed trials kept, each
    trial once in Optuna, Parquet and MLflow."""
    import signal

    import yaml

    nodes, _ = two_nodes
    storage, name = str(tmp_path / "shared"), "killed"
    study = StudyDir(storage, name)
    cmd = [sys.executable, "-m", "gcs_tune.search", "--space", str(space_file(tmp_path, fast_space)), "--gpus", "0",
           "--address", nodes.address, "--storage", storage, "--tracking-uri", server.uri, "--name", name, "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        done = (study.local / "trials.parquet").exists() and read_table(study)["state"].isin(TERMINAL).sum()
        if done and done < TRIALS:
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the driver ended before a trial finished: nothing to kill mid-study"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = read_table(study)
    kept = before[before["state"].isin(TERMINAL)].set_index("trial_id")["mlflow_run_id"]
    live = {t.user_attrs["ray_trial_id"]: t.state.name for t in stored_optuna(study)}  # written while it ran
    assert all(live[tid] != "RUNNING" for tid in kept.index) and "RUNNING" in live.values()

    assert search.main(["--resume", "--name", name, "--storage", storage, "--address", nodes.address,
                        "--quiet"]) == 0
    assert_counted_once(study)
    after = read_table(study).set_index("trial_id")
    assert (after.loc[kept.index, "mlflow_run_id"] == kept).all()  # finished trials kept their runs
    optuna_view = yaml.safe_load((study.local / "optuna.yaml").read_text())  # the searcher's own study
    assert sum(optuna_view["states"].values()) == TRIALS and "running" not in optuna_view["states"]
