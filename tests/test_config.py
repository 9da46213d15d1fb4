from pathlib import Path

import pytest

from gcs_tune.config import ConfigError, load_config, parse_overrides
from gcs_tune.train import main as train_main


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_lab_and_frozen():
    cfg = load_config()
    assert cfg.data.dataset == "lab" and cfg.backbone.model == "lab"
    with pytest.raises(Exception):
        cfg.method.rho = 3.0  # frozen


def test_the_shipped_paper_recipe_loads_and_asks_for_a_root(tmp_path):
    recipe = Path(__file__).parents[1] / "pipelines" / "configs" / "paper_vit_b16.yaml"
    cfg = load_config(recipe, {"data.root": str(tmp_path)})
    assert (cfg.optim.batch_size, cfg.schedule.epochs, cfg.backbone.model) == (128, 200, "ViT-B-16")
    with pytest.raises(ConfigError, match="paper_vit_b16.yaml.*needs data.root"):
        load_config(recipe)


@pytest.mark.parametrize("text, key", [
    ("method:\n  rho: 0.1\n  rhoo: 2\n", "method.rhoo: unknown key"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("optim:\n  lr: -1\n", "optim.lr"),
    ("method:\n  beta1: 0.9\n  beta2: 0.2\n", "beta2 (0.2) must be >= beta1"),
    ("method:\n  name: adamw_coop\n", "unknown method 'adamw_coop'"),
    ("data:\n  dataset: dtd\n", "needs data.root"),
    ("objective:\n  floor: absolute\n", "needs objective.value"),
    ("prompt:\n  n_ctx: 0\n", "prompt.n_ctx"),
])
def test_bad_values_name_the_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_overrides_are_yaml_scalars_and_validated():
    assert parse_overrides(["method.rho=0.2", "prompt.init=null", "eval.test=false"]) == {
        "method.rho": 0.2, "prompt.init": None, "eval.test": False}
    cfg = load_config(None, parse_overrides(["method.rho=0.2", "prompt.init=null"]))
    assert cfg.method.rho == 0.2 and cfg.prompt.init is None
    with pytest.raises(ConfigError, match="method.nope: unknown key"):
        load_config(None, {"method.nope": 1})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["method.rho"])


def test_replace_revalidates():
    cfg = load_config()
    assert cfg.replace(**{"method.rho": 8.0}).method.rho == 8.0
    with pytest.raises(ConfigError):
        cfg.replace(**{"method.rho": -1})


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, "optim:\n  lr: 0.002\n  batchsize: 3\n")
    assert train_main(["--config", str(path), "--out", str(out)]) == 2
    assert "optim.batchsize: unknown key" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert train_main(["--out", str(out), "data.dataset=dtd", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()
