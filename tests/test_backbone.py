"""Backbone loading: names, tags and paths; unavailable weights fail at once with a hint."""
import time

import open_clip
import pytest
import torch

from gcs_tune.config import BackboneConfig
from gcs_tune.model.backbone import BackboneError, load_backbone


def test_missing_hub_weights_fail_fast_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        load_backbone(BackboneConfig(model="ViT-B-16", pretrained="openai", device="cpu"))
    assert time.perf_counter() - start < 60  # no minute of hub retries
    message = str(err.value)
    assert "ViT-B-16" in message and "backbone.pretrained=/path/to/ViT-B-16.pt" in message


@pytest.mark.parametrize("cfg, text", [
    (BackboneConfig(model="ViT-Q-99"), "not an open_clip model"),
    (BackboneConfig(model="ViT-B-16", pretrained="no_such_tag"), "is not a tag of ViT-B-16"),
    (BackboneConfig(model="ViT-B-16", pretrained="/nowhere/model.pt"), "/nowhere/model.pt: no such checkpoint file"),
])
def test_bad_names_are_clear_errors(cfg, text):
    with pytest.raises(BackboneError, match=text):
        load_backbone(cfg)


def test_local_checkpoint_path_loads_those_weights(tmp_path):
    torch.manual_seed(0)
    import gcs_tune.model.backbone  # noqa: F401  registers lab-vit-tiny
    source = open_clip.create_model("lab-vit-tiny")
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    bb = load_backbone(BackboneConfig(model="lab-vit-tiny", pretrained=str(path), device="cpu"))
    assert bb.weights.startswith("file:") and bb.image_size == 32
    assert all(not p.requires_grad for p in bb.model.parameters())
    torch.testing.assert_close(bb.model.state_dict()["token_embedding.weight"], source.state_dict()["token_embedding.weight"])
    random = load_backbone(BackboneConfig(model="lab-vit-tiny", device="cpu"))
    assert random.weights == "random"
