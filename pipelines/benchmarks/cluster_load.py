"""Load test of the cluster path: many one-epoch lab trials through a two-node Ray cluster (two
raylets on this host, as Ray's own tests start them) into a real ``mlflow server`` process, then
every trial counted in Optuna, Parquet and MLflow; the driver's peak memory and trials per minute.

    python pipelines/benchmarks/cluster_load.py                 # 200 trials, 1 epoch each
    python pipelines/benchmarks/cluster_load.py --trials 50 --json out.json

The search is the command a user runs (``gcs_tune.search --address ADDR --tracking-uri http://…``),
called in this process so its peak RSS is the driver's. Trials per minute count from the first
trial's start to the last one's end (Ray and the server already up, features cached).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
from check_ui import free_port, serve  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--json", help="also write the numbers here")
    return p.parse_args(argv)


def space(folder: Path, trials: int, epochs: int) -> Path:
    """GCSCoOp on the lab, small enough that Ray's and MLflow's per-trial costs dominate."""
    tree = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    tree["base"].update(data={"dataset": "lab", "shots": 4, "val_shots": 4, "views": 1},
                        schedule={"epochs": epochs, "warmup_epochs": 0})
    tree.update(trials=trials, scheduler={"type": "fifo"}, objective={"selection": "pseudo_novel",
                                                                     "floor": "zero_shot", "tolerance": 5.0})
    path = folder / "load.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gcs_tune.tune  # noqa: F401 -- first: it turns Ray's token auth on before Ray reads its settings
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from gcs_tune import search
    from gcs_tune.tune.optuna_study import OPTUNA_DB
    from gcs_tune.tune.results import read_table
    from gcs_tune.tune.study import StudyDir, StudyInfo

    work = Path(tempfile.mkdtemp(prefix="gcs_load_"))
    port = free_port()
    server = serve([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination",
                    str(work / "artifacts"), "--workers", "1"], f"http://127.0.0.1:{port}/health", work / "server.log")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    try:
        storage, started = str(work / "shared"), time.time()
        code = search.main(["--space", str(space(work, args.trials, args.epochs)), "--gpus", "0",
                            "--address", nodes.address, "--storage", storage, "--name", "load",
                            "--tracking-uri", f"http://127.0.0.1:{port}", "--quiet"])
        wall = time.time() - started
        assert code == 0, f"search exited {code}"
        study = StudyDir(storage, "load")
        frame, info = read_table(study), StudyInfo.load(study)
        client = MlflowClient(info.tracking_uri)
        exp = client.get_experiment_by_name(info.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{info.parent_run_id}'",
                                  max_results=50000)
        import optuna

        optuna_trials = optuna.load_study(study_name=info.name, storage=f"sqlite:///{study.local / OPTUNA_DB}").trials
        span_min = (frame["ended_at"].max() - frame["started_at"].min()) / 60
        out = {"trials": args.trials, "epochs": args.epochs, "nodes": 2,
               "parquet_rows": len(frame), "parquet_unique": int(frame["trial_id"].nunique()),
               "mlflow_child_runs": len(runs),
               "mlflow_unique": len({r.data.tags.get("gcs_tune.trial_id") for r in runs}),
               "optuna_trials": len(optuna_trials), "states": frame["state"].value_counts().to_dict(),
               "trials_per_minute": round(len(frame) / span_min, 1), "search_wall_s": round(wall, 1),
               "driver_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        out["every_trial_once"] = (out["parquet_rows"] == out["parquet_unique"] == out["mlflow_child_runs"]
                                   == out["mlflow_unique"] == out["optuna_trials"] == args.trials)
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0 if out["every_trial_once"] else 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()
        server.terminate()


if __name__ == "__main__":
    raise SystemExit(main())
