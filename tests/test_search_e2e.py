"""The search end to end on the lab, CPU, real Ray (started once for this module), real Optuna,
real MLflow sqlite store: 4 short trials leave 4 child runs under one parent and 4 Parquet rows;
a diverging trial and a raising trial end recorded (diverged / failed) while the study goes on;
--gpus 8 on a machine without GPUs stops at once; best --export writes a YAML gcs_tune.train runs."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402

from gcs_tune import best, search, train  # noqa: E402
from gcs_tune.tune.results import read_table  # noqa: E402
from gcs_tune.tune.study import StudyDir, StudyInfo  # noqa: E402


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory, fast_space):
    tmp = tmp_path_factory.mktemp("e2e")
    code = search.main(["--space", str(fast_space(tmp)), "--gpus", "0", "--storage", str(tmp / "s"),
                        "--name", "e2e", "--quiet"])
    assert code == 0
    return StudyDir(str(tmp / "s"), "e2e")


def child_runs(info: StudyInfo):
    client = MlflowClient(info.tracking_uri)
    exp = client.get_experiment_by_name(info.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == info.parent_run_id], runs


def test_four_trials_four_child_runs_one_parent(study):
    info = StudyInfo.load(study)
    assert info.tracking_uri == f"sqlite:///{study.local}/mlflow.db"
    client, children, runs = child_runs(info)
    assert len(children) == 4
    assert len({r.data.tags["gcs_tune.trial_id"] for r in children}) == 4
    parents = [r for r in runs if r.data.tags.get("gcs_tune.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_files = {a.path for a in client.list_artifacts(info.parent_run_id)}
    assert {"space.yaml", "trials.parquet", "study.yaml", "plots"} <= parent_files
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"rho", "n_ctx", "lr", "method.name", "schedule.epochs"} <= set(run.data.params)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "hm")]
        assert steps == [1, 2]  # one value per epoch, step = epoch
        assert {"feasible", "objective", "frac_gs", "base_acc_se", "novel_acc_se"} <= set(run.data.metrics)
        assert "test_hm" not in run.data.metrics  # pseudo_novel selection: no test split during the search
        assert run.data.tags["gcs_tune.selection"] == "pseudo_novel" and run.data.params["data.split"] == "pseudo_novel"
        assert {"prompt.pt", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_reference_run_sets_the_floor(study):
    info = StudyInfo.load(study)
    _, _, runs = child_runs(info)
    refs = [r for r in runs if r.data.tags.get("gcs_tune.role") == "reference"]
    assert len(refs) == 1 and refs[0].data.params["method.name"] == "coop"
    assert info.base["objective"]["value"] == pytest.approx(info.reference["base_acc"])
    assert not info.reference_pending


def test_parquet_has_a_row_per_trial(study):
    frame = read_table(study)
    assert len(frame) == 4 and set(frame["state"]) == {"complete"}
    assert frame["is_default"].sum() == 1
    assert frame.loc[frame["is_default"], "param.rho"].item() == 0.1
    for col in ("objective", "hm", "base_acc", "novel_acc", "violation", "base_acc_se", "duration_s"):
        assert frame[col].map(math.isfinite).all(), col
    assert frame["test_hm"].isna().all()  # never measured during a pseudo_novel search
    optuna_view = yaml.safe_load((study.local / "optuna.yaml").read_text())
    assert optuna_view["states"] == {"complete": 4}
    if optuna_view["best"]:  # Optuna's trial numbers are the study's: its best is the row of that number
        row = frame.set_index("number").loc[optuna_view["best"]["number"]]
        assert json.loads(row["params_json"]) == pytest.approx(optuna_view["best"]["params"])


def test_diverging_and_raising_trials_are_recorded(ray_cluster, tmp_path, fast_space):
    """lr = 1e30 diverges (NaN loss: finite worst objective); 0.002 raises in this trainable, is
    retried once, then recorded failed. The study finishes either way."""
    from gcs_tune.tune.runner import SearchOptions, run_search
    from gcs_tune.tune.trainable import train_trial

    def flaky(config, setup):
        if config["lr"] < 1:
            raise RuntimeError("injected failure")
        train_trial(config, setup)

    space = fast_space(tmp_path, params={"lr": {"key": "optim.lr", "type": "choice", "values": [1e30, 0.002]}},
                       defaults={"lr": 1e30}, trials=3, objective={"floor": "absolute", "value": 1.0})
    outcome = run_search(SearchOptions(space=str(space), gpus=0, storage=str(tmp_path / "s"), name="bad",
                                       live=False, overrides={"schedule.warmup_epochs": 0, "schedule.epochs": 4}),
                         trainable=flaky)
    assert not outcome.interrupted and outcome.winner is None
    frame = read_table(outcome.study)
    assert len(frame) == 3 and set(frame["state"]) <= {"diverged", "failed"}
    diverged = frame[frame["state"] == "diverged"]
    assert len(diverged) >= 1 and diverged["objective"].map(math.isfinite).all()
    assert (diverged["objective"] < -100).all() and (diverged["epoch"] < 4).all()  # stopped at the NaN
    failed = frame[frame["state"] == "failed"]
    assert (failed["failures"] == 2).all() and failed["error"].str.contains("injected failure").all()
    assert failed["log"].map(lambda p: p.endswith("stderr.log") and Path(p).is_file()).all()  # printed for the user
    _, children, _ = child_runs(outcome.info)
    assert len(children) == 3
    assert sorted(r.info.status for r in children) == sorted(
        "FAILED" if s == "failed" else "FINISHED" for s in frame["state"])
    states = yaml.safe_load((outcome.study.local / "optuna.yaml").read_text())["states"]
    assert states.get("fail", 0) == len(failed) and states.get("complete", 0) == len(diverged)


def test_more_gpus_than_the_cluster_has_stops_at_once(ray_cluster, tmp_path, capsys, fast_space):
    start = time.perf_counter()
    code = search.main(["--space", str(fast_space(tmp_path)), "--gpus", "8", "--storage", str(tmp_path / "s"),
                        "--quiet"])
    assert code == 2 and time.perf_counter() - start < 30
    err = " ".join(capsys.readouterr().err.split())  # the CLI console wraps long lines
    assert "--gpus 8" in err and "0 GPU" in err


def test_dashboard_without_its_extra_is_a_clear_error(ray_cluster, tmp_path, capsys, fast_space):
    pytest.importorskip("ray")
    if __import__("importlib").util.find_spec("aiohttp_cors") is not None:
        pytest.skip("ray[default] is installed here: the dashboard would start")
    code = search.main(["--space", str(fast_space(tmp_path)), "--gpus", "0", "--storage", str(tmp_path / "s"),
                        "--dashboard", "--quiet"])
    assert code == 2 and "pip install -e '.[dashboard]'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s").exists()


def test_best_reruns_finalists_then_measures_winner_defaults_and_coop(study, tmp_path, capsys):
    out = tmp_path / "export"
    code = best.main(["--storage", study.storage, "--name", "e2e", "--finalists", "2", "--finalist-seeds", "1",
                      "--export", str(out), "--seeds", "1,2"])
    assert code == 0
    printed = " ".join(capsys.readouterr().err.split())
    assert "selection pseudo_novel" in printed and "winner: trial" in printed
    assert "lead over the defaults" in printed or "the paper defaults themselves" in printed
    finalists = (study.local / "finalists.md").read_text()
    assert "(defaults)" in finalists and finalists.count("\n| ") >= 3  # the top 2 and the defaults
    assert len(list((study.local / "finalists").glob("trial-*/seed2/result.json"))) >= 2  # seed 2: never searched
    table = (out / "test.md").read_text()
    for row in ("zero-shot", "paper defaults", "CoOp (study recipe)", "winner (trial"):
        assert row in table
    assert "95 % interval over 2 paired seeds" in table
    for label in ("winner", "defaults", "coop"):
        result = json.loads((out / label / "seed2" / "result.json").read_text())
        assert result["split"] == "base_novel" and math.isfinite(result["hm"])  # the protocol, on the test split
    exported = yaml.safe_load((out / "winner.yaml").read_text())
    assert exported["eval"]["test"] is True and exported["data"]["split"] == "base_novel"
    assert train.main(["--config", str(out / "winner.yaml"), "--epochs", "1", "--out", str(tmp_path / "t"),
                       "--quiet"]) == 0
    assert json.loads((tmp_path / "t" / "result.json").read_text())["epochs"] == 1
    info = StudyInfo.load(study)
    _, children, runs = child_runs(info)
    exports = [r for r in runs if r.data.tags.get("gcs_tune.role") == "export"]
    assert len(exports) == 1 and exports[0].data.tags["gcs_tune.study_run_id"] == info.parent_run_id
    assert len(children) == 4  # the export is linked to the study, not one of its trials


def test_compare_two_spaces_tuned_against_tuned(ray_cluster, tmp_path, fast_space, capsys):
    from gcs_tune import compare

    coop_dir, gcs_dir = tmp_path / "a", tmp_path / "b"
    coop_dir.mkdir(), gcs_dir.mkdir()
    coop = fast_space(coop_dir, params={"lr": {"key": "optim.lr", "type": "loguniform", "low": 1e-3, "high": 1e-2}},
                      defaults={"lr": 0.002}, objective={"floor": "zero_shot", "tolerance": 5.0})
    tree = yaml.safe_load(coop.read_text())
    tree["base"]["method"]["name"] = "coop"
    coop.unlink()
    coop = coop_dir / "coop.yaml"
    coop.write_text(yaml.safe_dump(tree))
    gcs = fast_space(gcs_dir).rename(gcs_dir / "gcscoop.yaml")
    args = ["--spaces", str(coop), str(gcs), "--trials", "3", "--seeds", "1,2", "--gpus", "0", "--finalists", "1",
            "--finalist-seeds", "1", "--storage", str(tmp_path / "s"), "--name", "cmp", "--quiet"]
    assert compare.main(args + ["optim.lr=-1"]) == 2  # checked for every space before anything runs
    assert not (tmp_path / "s" / "cmp").exists()
    assert compare.main(args) == 0
    folder = tmp_path / "s" / "cmp"
    table = (folder / "table.md").read_text()
    assert "zero-shot" in table and "coop (coop) | tuned | " in table and "gcscoop (gcscoop) | defaults" in table
    assert "ΔHM vs coop tuned" in table and "reference" in table
    frame = pd.read_parquet(folder / "table.parquet")
    assert len(frame) == 2 * 2 * 2 and set(frame["seed"]) == {1, 2}  # spaces x settings x seeds
    assert (folder / "base_vs_novel.png").stat().st_size > 10_000
    assert (folder / "studies" / "gcscoop" / "finalists.md").is_file()
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id], max_results=1000)
    top = [r for r in runs if r.data.tags.get("gcs_tune.role") == "comparison"]
    studies = [r for r in runs if r.data.tags.get("gcs_tune.role") == "study"]
    assert len(top) == 1 and len(studies) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == top[0].info.run_id for r in studies)
    capsys.readouterr()
    assert compare.main(["--resume", "--name", "cmp", "--storage", str(tmp_path / "s"), "--quiet"]) == 0
    again = capsys.readouterr().out + capsys.readouterr().err
    assert "finished earlier, reused" in again and "training" not in again  # nothing is trained twice
