"""The family's search spaces validate (ViT-B/16 paper base config, pseudo_novel selection) and
every corner of each space is a valid run config."""
from pathlib import Path

import pytest

from gcs_tune.tune.validate import load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("name", ["subpt", "subpt_nfl", "promptsrc", "caspl_coop", "caspl_promptsrc"])
def test_family_spaces_validate(name):
    space = load_space(SPACES / f"{name}.yaml", {"data.root": "/tmp"})
    assert space.base.method.name == name and space.base.backbone.model == "ViT-B-16"
    assert space.base.objective.selection == "pseudo_novel" and space.params
