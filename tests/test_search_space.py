"""Search spaces without Ray: YAML validation (errors name the key, exit 2), the space -> Optuna
conversion through FixedTrial, the searcher's constraint and PRUNED bookkeeping, and the
trainable's report sanitising. Nothing here starts Ray."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from gcs_tune.config import ConfigError
from gcs_tune.tune.validate import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"

GOOD = {
    "base": {"data": {"dataset": "lab"}, "method": {"name": "gcscoop"}, "schedule": {"epochs": 4}},
    "params": {
        "rho": {"key": "method.rho", "type": "loguniform", "low": 1e-3, "high": 10.0},
        "beta1": {"key": "method.beta1", "type": "uniform", "low": 0.0, "high": 0.9},
        "beta2": {"key": "method.beta2", "type": "uniform", "low": "beta1", "high": 1.0},
        "n_ctx": {"key": "prompt.n_ctx", "type": "choice", "values": [2, 4, 8, 16]},
        "lr": {"key": "optim.lr", "type": "loguniform", "low": 1e-4, "high": 5e-2},
    },
    "defaults": {"rho": 0.1, "beta1": 0.5, "beta2": 0.8, "n_ctx": 4, "lr": 0.002},
    "objective": {"floor": "reference", "tolerance": 1.0},
    "trials": 8,
}


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def changed(**edits) -> dict:
    """GOOD with dotted edits; a value of None deletes the key."""
    tree = yaml.safe_load(yaml.safe_dump(GOOD, sort_keys=False))
    for dotted, value in edits.items():
        *head, last = dotted.split("__")
        node = tree
        for part in head:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return tree


@pytest.mark.parametrize("name", ["demo", "gcscoop", "coop", "sam"])
def test_shipped_spaces_validate(name):
    space = load_space(SPACES / f"{name}.yaml", {"data.root": "/tmp"} if name != "demo" else {})
    assert space.spec.trials >= 1 and space.params


def test_gcscoop_space_is_the_papers():
    space = load_space(SPACES / "gcscoop.yaml", {"data.root": "/tmp"})
    rho = space.params["rho"]
    assert rho.type == "loguniform" and rho.low <= 0.1 and rho.high >= 8.0
    assert space.params["n_ctx"].values == [2, 4, 8, 16]
    assert space.spec.defaults == {"rho": 0.1, "beta1": 0.5, "beta2": 0.8, "n_ctx": 4, "lr": 0.002}
    assert space.base.objective.floor == "reference" and space.needs_reference


@pytest.mark.parametrize("edits, words", [
    ({"params__rho__typo": 1}, ["params.rho.typo", "unknown key"]),
    ({"bogus": 1}, ["bogus", "unknown key"]),
    ({"params__rho__type": "gaussian"}, ["params.rho.type"]),
    ({"params__lr__low": 0.1}, ["params.lr", "empty range"]),
    ({"params__rho__low": 0.0}, ["params.rho", "loguniform needs low > 0"]),
    ({"params__n_ctx__values": []}, ["params.n_ctx", "non-empty"]),
    ({"params__beta2__low": "nope"}, ["params.beta2", "'nope'"]),
    ({"params__kg__key": "method.kg_weight", "params__kg__type": "uniform", "params__kg__low": 1,
      "params__kg__high": 9}, ["params.kg", "'gcscoop' has no parameter 'kg_weight'"]),
    ({"params__n_ctx__values": [4, 128]}, ["n_ctx=128", "prompt.n_ctx"]),
    ({"params__lr__key": "optim.nope"}, ["optim.nope", "unknown key"]),
    ({"defaults__rho": 50.0}, ["defaults", "rho=50.0"]),
    ({"defaults__beta2": None}, ["defaults", "no value for beta2"]),
    ({"params__beta2__type": "int", "params__beta2__log": True}, ["params.beta2", "log: true", "numeric low"]),
    ({"params__beta2__type": "loguniform"}, ["params.beta2", "loguniform needs low > 0", "low can reach 0.0"]),
    ({"params__beta2_u": {"key": "method.rho", "type": "uniform", "low": 0.1, "high": 1.0}},
     ["params.beta2", "'beta2_u'", "rename"]),
    ({"base__schedule__epochs": 0}, ["schedule.epochs"]),
    ({"objective__floor": "sometimes"}, ["objective", "floor"]),
])
def test_bad_spaces_name_the_key(tmp_path, edits, words):
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, changed(**edits)))
    for word in words:
        assert word in str(err.value), str(err.value)
    assert str(write(tmp_path, {})).split("/")[-1] in str(err.value)  # and the file


def test_conditional_bounds_reach_the_config_check(tmp_path):
    tree = changed(params__beta2=None, defaults__beta2=None)  # beta1 up to 0.9 against base beta2 0.8
    with pytest.raises(ConfigError, match="beta2 .* must be >= beta1"):
        load_space(write(tmp_path, tree))


def test_method_conditional_parameters(tmp_path):
    tree = changed(params__beta1__when={"method": ["gcscoop"]}, params__beta2__when={"method": ["gcscoop"]},
                   defaults__beta1=None, defaults__beta2=None)
    tree["params"] = {"method": {"key": "method.name", "type": "choice", "values": ["sam_coop", "gcscoop"]},
                      **tree["params"]}
    tree["defaults"]["method"] = "sam_coop"
    space = load_space(write(tmp_path, tree))
    sam = space.sampler()(optuna.trial.FixedTrial({"method": "sam_coop", "rho": 0.2, "n_ctx": 4, "lr": 0.01}))
    assert sam == {"method": "sam_coop", "rho": 0.2, "n_ctx": 4, "lr": 0.01}  # no beta1/beta2
    assert space.apply(sam).method.name == "sam_coop"


def test_space_to_optuna_with_fixed_trial():
    space = load_space(SPACES / "demo.yaml")
    values = {"rho": 0.3, "beta1": 0.2, "beta2": 0.7, "n_ctx": 8, "lr": 0.01}
    sampler = space.sampler()
    params = sampler.to_optuna(values)  # beta2's bound is beta1: Optuna sees its position in [0, 1]
    assert params == {"rho": 0.3, "beta1": 0.2, "beta2_u": pytest.approx(0.625), "n_ctx": 8, "lr": 0.01}
    assert sampler(optuna.trial.FixedTrial(params)) == pytest.approx(values)
    cfg = space.apply(values)
    assert (cfg.method.rho, cfg.method.beta1, cfg.method.beta2, cfg.prompt.n_ctx, cfg.optim.lr) == \
        (0.3, 0.2, 0.7, 8, 0.01)


def test_sampled_beta2_never_below_beta1():
    space = load_space(SPACES / "demo.yaml")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(40):
        trial = study.ask()
        values = space.sampler()(trial)
        assert values["beta1"] <= values["beta2"] <= 1.0
        assert 1e-3 <= values["rho"] <= 10 and values["n_ctx"] in (2, 4, 8, 16)
        study.tell(trial, 0.0)


def test_search_cli_exits_2_naming_the_key(tmp_path, capsys):
    from gcs_tune import search

    code = search.main(["--space", str(write(tmp_path, changed(params__rho__type="gauss"))), "--quiet"])
    assert code == 2
    assert "params.rho.type" in " ".join(capsys.readouterr().err.split())


def test_searcher_tells_pruned_and_sets_constraint(tmp_path):
    from gcs_tune.tune.searcher import build_searcher

    space = load_space(SPACES / "demo.yaml", trials=3)
    limiter = build_searcher(space, 2, str(tmp_path / "optuna.yaml"))
    searcher = limiter.searcher
    first = searcher.suggest("a")
    assert first == space.spec.defaults  # the paper defaults go first
    searcher.suggest("b")
    searcher.suggest("c")
    base = {"hm": 30.0, "base_acc": 40.0, "novel_acc": 24.0, "feasible": 1.0, "violation": 0.0,
            "diverged": 0.0, "epochs": 8.0}
    for tid in "abc":
        searcher.on_trial_result(tid, {**base, "objective": 30.0, "epoch": 1.0, "training_iteration": 1})
    searcher.on_trial_complete("a", {**base, "objective": 30.0, "epoch": 8.0})  # ran all epochs
    searcher.on_trial_complete("b", {**base, "objective": 20.0, "epoch": 3.0})  # stopped by ASHA
    searcher.on_trial_complete("c", {**base, "objective": -5.0, "feasible": 0.0, "violation": 4.0, "epoch": 8.0})
    trials = searcher._ot_study.get_trials()
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                      optuna.trial.TrialState.COMPLETE]
    assert [t.constraints.get("base_floor") for t in trials] == [0.0, 0.0, 4.0]
    assert searcher._ot_study.best_trial.number == 0
    assert (tmp_path / "optuna.yaml").is_file()


def test_reports_are_always_finite():
    from gcs_tune.config import load_config
    from gcs_tune.engine import Accuracy, EpochResult
    from gcs_tune.tune.trainable import epoch_metrics

    cfg = load_config(None, {"schedule.epochs": 3})
    res = EpochResult(2, 3, float("nan"), 1e30, Accuracy(float("nan"), 1.0), float("nan"), False, 0.0, None,
                      0.1, {"mean_cos": float("nan")}, diverged=True)
    out = epoch_metrics(res, cfg, 0.0).to_ray()
    assert all(math.isfinite(v) for v in out.values())
    assert {"objective", "hm", "base_acc", "novel_acc", "feasible", "violation"} <= set(out)
    assert out["diverged"] == 1.0 and "mean_cos" not in out
    assert out["objective"] < -100


def test_relative_tracking_uris_are_made_absolute(tmp_path, monkeypatch):
    from gcs_tune.tune.tracking import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert absolute_tracking_uri(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    assert absolute_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_resume_of_an_unknown_study_exits_2(tmp_path, capsys):
    from gcs_tune import search

    assert search.main(["--resume", "--storage", str(tmp_path), "--name", "nope", "--quiet"]) == 2
    assert "no study here" in " ".join(capsys.readouterr().err.split())  # the CLI console wraps lines
    assert search.main(["--resume", "--storage", str(tmp_path), "--quiet"]) == 2  # nothing to pick
