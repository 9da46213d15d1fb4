"""The training loop on the lab data with the lab architecture (random weights: fast)."""
import json
import math

import pytest
import torch

from gcs_tune.config import load_config
from gcs_tune.engine import fit
from gcs_tune.methods import METHODS
from gcs_tune.prepare import prepare
from gcs_tune.train import main as train_main


def test_fit_yields_one_result_per_epoch_and_tests_once(fast_cfg):
    results = list(fit(fast_cfg(**{"schedule.epochs": 3})))
    assert [r.epoch for r in results] == [1, 2, 3]
    assert all(r.final is None for r in results[:-1]) and results[-1].final is not None
    last = results[-1]
    assert math.isfinite(last.train_loss) and 0 <= last.val.base <= 100
    assert set(last.diagnostics) == {"frac_g", "frac_proj", "frac_gs", "mean_cos"}
    assert math.isclose(sum(last.diagnostics[k] for k in ("frac_g", "frac_proj", "frac_gs")), 1.0)
    metrics = last.metrics()
    assert {"base_acc", "novel_acc", "hm", "objective", "test_hm", "lr"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert last.final.prompt["ctx"].shape == (4, 128) and len(last.final.prompt["classnames"]) == 64


def test_deterministic_on_cpu(fast_cfg):
    cfg = fast_cfg()
    prep = prepare(cfg)
    a, b = list(fit(cfg, prep)), list(fit(cfg, prep))
    assert [r.train_loss for r in a] == [r.train_loss for r in b]
    assert torch.equal(a[-1].final.prompt["ctx"], b[-1].final.prompt["ctx"])


def test_features_come_from_the_cache_the_second_time(fast_cfg, caplog):
    cfg = fast_cfg()
    first = prepare(cfg)
    caplog.set_level("INFO", logger="gcs_tune.prepare")
    second = prepare(cfg)
    assert caplog.text.count("cache hit") == 2 and "computed" not in caplog.text  # val, test
    assert first.encoding.draws == 1 and second.encoding.draws == 0  # the train draw was read back
    assert torch.equal(first.train.held, second.train.held)
    assert first.train.labels.max() < 32  # training sees base classes only


# Knobs that keep a row's extra work small: SubPT's pilot pass, NFL's names, CasPL's stage 1 (whose
# recipe is 20 epochs over every train image with a separate teacher).
SMALL_EXTRAS = {"method.subspace_epochs": 1, "method.subspace_rank": 1, "method.nfl_names": "novel",
                "method.teacher_model": "lab-vit-tiny", "method.boost_epochs": 1, "method.boost_shots": 1,
                "method.boost_batch_size": 64, "method.boost_n_ctx": 2}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_in_the_table_trains(fast_cfg, name):
    last = list(fit(fast_cfg(**{**SMALL_EXTRAS, "method.name": name, "schedule.epochs": 1})))[-1]
    assert math.isfinite(last.train_loss) and last.final is not None


def test_divergence_is_reported_finite_and_stops(fast_cfg):
    results = list(fit(fast_cfg(**{"optim.lr": 1e30, "schedule.warmup_epochs": 0, "schedule.epochs": 5,
                                   "method.name": "coop"})))
    assert results[-1].diverged and len(results) < 5
    assert all(math.isfinite(v) for v in results[-1].metrics().values())


def test_train_cli_writes_result_prompt_and_config(fast_cfg, tmp_path):
    cfg = fast_cfg()
    out = tmp_path / "run"
    args = ["--out", str(out), "--method", "sam_coop", "--epochs", "2", "--seed", "3", "--quiet",
            f"data.cache_dir={cfg.data.cache_dir}", "backbone.model=lab-vit-tiny", "data.views=1",
            "data.shots=4", "data.lab_test_per_class=4"]
    assert train_main(args) == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("method", "base_acc", "novel_acc", "hm", "objective", "feasible", "zero_shot_base_acc",
                "zero_shot_novel_acc", "epochs", "seconds"):
        assert key in result
    assert result["method"] == "sam_coop" and result["epochs"] == 2 and 0 <= result["base_acc"] <= 100
    prompt = torch.load(out / "prompt.pt", weights_only=True)
    assert prompt["ctx"].shape == (4, 128) and len(prompt["classnames"]) == 64
    reloaded = load_config(out / "config.yaml")
    assert reloaded.seed == 3 and reloaded.method.name == "sam_coop"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no staging folder left
