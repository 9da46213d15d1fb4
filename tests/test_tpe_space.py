"""The TPE the searcher runs, without Ray: a bound naming another parameter reaches Optuna as a
fixed-distribution unit position (so the multivariate TPE models beta1 and beta2 jointly), the
trial values stay in the user's terms, the enqueued defaults come back exactly, and the default
cap on trials at once."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.search_space import intersection_search_space

from gcs_tune.tune.searcher import concurrency_cap, default_concurrency, startup_trials, tpe_sampler
from gcs_tune.tune.space import Param, SpaceSampler
from gcs_tune.tune.validate import load_space

# (0.2, 0.9): u = 0.7 / 0.8 = 0.8749999999999999 and 0.2 + u * 0.8 = 0.8999999999999999, not 0.9
DEFAULTS = {"rho": 0.1, "beta1": 0.2, "beta2": 0.9, "lr": 0.002}
SPACE = {
    "base": {"data": {"dataset": "lab"}, "method": {"name": "gcscoop"}, "schedule": {"epochs": 4}},
    "params": {
        "rho": {"key": "method.rho", "type": "loguniform", "low": 1e-3, "high": 10.0},
        "beta1": {"key": "method.beta1", "type": "uniform", "low": 0.0, "high": 0.9},
        "beta2": {"key": "method.beta2", "type": "uniform", "low": "beta1", "high": 1.0},
        "lr": {"key": "optim.lr", "type": "loguniform", "low": 1e-4, "high": 5e-2},
    },
    "defaults": DEFAULTS,
    "objective": {"floor": "reference", "tolerance": 1.0},
    "trials": 8,
}


def _space(tmp_path: Path, tree: dict):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_space(path)


def _run(space, n_trials: int, objective) -> tuple[optuna.Study, list[dict]]:
    """The study the searcher runs, asked and told directly: its TPE, the defaults enqueued as
    Ray enqueues them, the space's define-by-run function."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = space.sampler()
    study = optuna.create_study(direction="maximize", sampler=tpe_sampler(space.spec, max_concurrent=1))
    study.enqueue_trial(sampler.to_optuna(space.spec.defaults))
    configs: list[dict] = []
    for _ in range(n_trials):
        trial = study.ask()
        configs.append(sampler(trial))
        study.tell(trial, objective(configs[-1]))
    return study, configs


def test_tpe_models_beta2_jointly_with_beta1_and_replays_the_defaults(tmp_path):
    space = _space(tmp_path, SPACE)
    assert 0.2 + space.sampler().to_optuna(DEFAULTS)["beta2_u"] * 0.8 != 0.9  # the naive map would miss
    # best where beta2 - beta1 is about 0.3: only a joint model of the two sees it
    study, configs = _run(space, 14, lambda c: -abs(c["beta2"] - c["beta1"] - 0.3) - abs(math.log10(c["rho"])))

    assert configs[0] == DEFAULTS  # exactly: the defaults trial is recognised by equality
    assert all("beta2_u" not in c and c["beta1"] <= c["beta2"] <= 1.0 for c in configs)
    shared = intersection_search_space(study.get_trials(deepcopy=False))
    assert shared["beta1"] == FloatDistribution(0.0, 0.9) and shared["beta2_u"] == FloatDistribution(0.0, 1.0)
    assert "beta2" not in shared
    # after the startup trials the multivariate TPE draws both from one joint density
    assert startup_trials(space.spec.trials) < len(configs)
    assert {"beta1", "beta2_u"} <= set(study.sampler.infer_relative_search_space(study, study.trials[-1]))
    for t, c in zip(study.trials, configs):  # beta2 = beta1 + u * (1 - beta1)
        assert c["beta2"] == pytest.approx(c["beta1"] + t.params["beta2_u"] * (1.0 - c["beta1"]), abs=1e-15)


def test_conditional_space_uses_the_group_decomposed_tpe(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(SPACE))
    tree["params"] = {"method": {"key": "method.name", "type": "choice", "values": ["sam_coop", "gcscoop"]},
                      **tree["params"]}
    for name in ("beta1", "beta2"):
        tree["params"][name]["when"] = {"method": ["gcscoop"]}
    tree["defaults"] = {"method": "gcscoop", **DEFAULTS}
    space = _space(tmp_path, tree)
    study, configs = _run(space, 10, lambda c: c["rho"])
    assert configs[0] == tree["defaults"]
    for c in configs:
        assert ("beta2" in c) == (c["method"] == "gcscoop")
        assert c.get("beta1", 0.0) <= c.get("beta2", 1.0) <= 1.0
    assert {"method", "beta1", "beta2_u"} <= {n for t in study.trials for n in t.params}


def test_unit_positions_of_loguniform_and_int_bounds():
    params = {name: Param.model_validate(raw) for name, raw in {
        "a": {"key": "x.a", "type": "uniform", "low": 1.0, "high": 10.0},
        "b": {"key": "x.b", "type": "loguniform", "low": "a", "high": 100.0},
        "c": {"key": "x.c", "type": "int", "low": 1, "high": "a"},
        "d": {"key": "x.d", "type": "int", "low": 0, "high": "a", "step": 2},
    }.items()}
    sampler = SpaceSampler(params)

    def at(u: float) -> dict:
        return sampler.from_optuna({"a": 4.5, "b_u": u, "c_u": u, "d_u": u})

    assert at(0.0) == {"a": 4.5, "b": 4.5, "c": 1, "d": 0}
    assert at(1.0) == {"a": 4.5, "b": 100.0, "c": 4, "d": 4}
    assert at(0.5)["b"] == pytest.approx(math.sqrt(4.5 * 100.0))  # uniform in the log
    assert [at(u)["c"] for u in (0.2, 0.3, 0.6, 0.8)] == [1, 2, 3, 4]  # 1..4, a quarter of [0, 1] each
    values = {"a": 4.5, "b": 20.0, "c": 3, "d": 2}
    assert sampler.from_optuna(sampler.to_optuna(values)) == pytest.approx(values)


def test_defaults_come_back_exactly_for_any_pair():
    params = {name: Param.model_validate(raw) for name, raw in SPACE["params"].items()}
    for b1 in [i / 10 for i in range(10)]:
        for b2 in [b1 + (1.0 - b1) * j / 7 for j in range(8)]:
            defaults = {"rho": 0.1, "beta1": b1, "beta2": b2, "lr": 0.002}
            sampler = SpaceSampler(params, defaults)
            assert sampler.from_optuna(sampler.to_optuna(defaults)) == defaults


def test_searcher_hands_ray_user_terms(tmp_path):
    from gcs_tune.tune.searcher import build_searcher

    space = _space(tmp_path, SPACE)
    searcher = build_searcher(space, 2, str(tmp_path / "optuna.yaml")).searcher
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == DEFAULTS and set(second) == set(DEFAULTS)
    result = {"objective": 1.0, "hm": 1.0, "violation": 0.0, "diverged": 0.0, "epoch": 4.0, "epochs": 4.0}
    searcher.on_trial_complete("a", result)
    assert yaml.safe_load((tmp_path / "optuna.yaml").read_text())["best"]["params"] == DEFAULTS


@pytest.mark.parametrize("trials, expected", [(1, 1), (3, 1), (8, 2), (12, 3), (16, 4), (32, 7), (48, 12),
                                              (64, 16), (200, 50)])
def test_default_concurrency(trials, expected):
    assert default_concurrency(trials, startup_trials(trials)) == expected


def test_default_concurrency_leaves_tpe_half_the_budget():
    for trials in range(1, 400):
        startup = startup_trials(trials)
        c = default_concurrency(trials, startup)
        assert c >= 1
        if c > 1:  # trials suggested with at least `startup` finished: all but the first startup + c - 1
            assert trials - (startup + c - 1) >= trials / 2 and c <= trials / 4


def test_explicit_max_concurrent_wins(tmp_path):
    assert concurrency_cap(_space(tmp_path, {**SPACE, "trials": 64}).spec) == 16
    assert concurrency_cap(_space(tmp_path, {**SPACE, "trials": 64, "resources": {"max_concurrent": 40}}).spec) == 40
