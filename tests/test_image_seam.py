"""The image-feature seam (gcs_tune.methods.sources): the tower path shows the crops the cache path
would, evaluation goes through it, and the cache path trains exactly as the loop before the seam."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gcs_tune.engine import fit
from gcs_tune.methods.assemble import build_run, tower_source
from gcs_tune.methods.loop import batches, learning_rate, train_epoch
from gcs_tune.methods.losses import LOSS_TERMS, LossInputs
from gcs_tune.methods.table import METHODS
from gcs_tune.model.deep import PromptedImageEncoder
from gcs_tune.model.prompters import CoOpPrompter, build_bank
from gcs_tune.model.text import PromptedTextEncoder
from gcs_tune.prepare import prepare

SMALL = {"data.shots": 2, "data.val_shots": 1, "data.lab_test_per_class": 1}


class Unprompted(torch.nn.Module):
    """The frozen tower itself, through the per-image path."""

    def image_features(self, encoder, pixels):
        return encoder(pixels, None, [])


@pytest.mark.parametrize("views", [2, "epoch"])
def test_the_tower_path_sees_the_crops_of_the_cache_path(fast_cfg, views):
    cfg = fast_cfg(**SMALL, **{"data.views": views, "schedule.epochs": 2})
    prep = prepare(cfg)
    encoder = PromptedImageEncoder(prep.backbone.model)
    source = tower_source(cfg, prep.backbone, encoder, prep.train, prep.images["train"], {}, prep.seed)
    for epoch in range(2):
        gen = torch.Generator().manual_seed(epoch)
        source.begin_epoch(epoch, gen)
        cached = prep.train.epoch(epoch, torch.Generator().manual_seed(epoch))  # the same draws picked
        idx = torch.arange(0, 64, 7)
        batch = source.batch(idx)
        with torch.no_grad():
            fresh = F.normalize(source.features(batch, Unprompted()), dim=-1)
        torch.testing.assert_close(batch.frozen, cached[idx])
        torch.testing.assert_close(fresh, cached[idx], rtol=0, atol=2e-3)  # the cache stores fp16
        assert torch.equal(batch.labels, prep.train.labels[idx])


def test_evaluation_goes_through_the_seam(fast_cfg):
    cfg = fast_cfg(**SMALL)
    prep = prepare(cfg)
    encoder = PromptedImageEncoder(prep.backbone.model)
    evals = {k: prep.images[k] for k in ("val", "test")}
    source = tower_source(cfg, prep.backbone, encoder, prep.train, prep.images["train"], evals, prep.seed)
    for name, cached in (("val", prep.val), ("test", prep.test)):
        split = source.split(name, Unprompted())
        assert torch.equal(split.labels, cached.labels)
        torch.testing.assert_close(split.features, cached.features, rtol=0, atol=1e-5)  # parquet keeps fp32


def test_the_cache_path_trains_as_the_loop_before_the_seam(fast_cfg):
    """CoOp through build_run/train_epoch against the engine's loop as it was written before the
    seam (copied here): the same context, bit for bit."""
    cfg = fast_cfg(**SMALL, **{"method.name": "coop", "schedule.epochs": 2, "optim.batch_size": 16})
    prep = prepare(cfg)
    run = build_run(cfg, prep)
    for epoch in range(2):
        train_epoch(run, epoch)
    bb = prep.backbone
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    encoder = PromptedTextEncoder(bb.model)
    bank = build_bank(encoder, bb.tokenizer, list(prep.classnames[:32]), list(range(32)), 4)
    prompter = CoOpPrompter(encoder, bb.tokenizer, 4, "a photo of a", 32, False, gen)
    params = list(prompter.parameters())
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, weight_decay=5e-4)
    scale = bb.model.logit_scale.exp().detach()
    for epoch in range(2):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        feats = prep.train.epoch(epoch, gen)
        for chunk in batches(torch.randperm(prep.train.labels.shape[0], generator=gen), 16):
            opt.zero_grad(set_to_none=False)
            text = prompter.text_features(encoder, bank)
            inputs = LossInputs(feats[chunk], prep.train.labels[chunk], text, prep.zero_shot_text[:32], scale)
            (1.0 * LOSS_TERMS["ce"](inputs)).backward()
            opt.step()
    assert torch.equal(run.prompter.ctx, prompter.ctx)


CASPL_SMALL = {**SMALL, "method.name": "caspl_coop", "method.teacher_model": "lab-vit-tiny", "method.boost_epochs": 1,
               "method.boost_shots": 1, "method.boost_batch_size": 64, "method.boost_n_ctx": 2,
               "optim.batch_size": 16, "optim.lr": 0.5, "schedule.epochs": 3}


@pytest.mark.parametrize("views", [2, "epoch"])
def test_frozen_vision_prompts_kept_train_as_the_tower_path(fast_cfg, monkeypatch, views):
    """CasPL + CoOp: its boosting prompt is frozen, so encoding each crop once (``frozen_tower``)
    gives the run that the tower path gives when it runs every step."""
    cfg = fast_cfg(**CASPL_SMALL, **{"data.views": views})
    prep = prepare(cfg)
    kept = list(fit(cfg, prep))
    monkeypatch.setitem(METHODS, "caspl_coop", dataclasses.replace(METHODS["caspl_coop"], images="tower"))
    every_step = list(fit(cfg, prep))
    for a, b in zip(kept, every_step):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.val.hm == pytest.approx(b.val.hm, abs=1e-9)
    tensors = {k: v for k, v in every_step[-1].final.prompt.items() if isinstance(v, torch.Tensor)}
    assert "adapt.ctx" in tensors
    for name, value in tensors.items():
        torch.testing.assert_close(kept[-1].final.prompt[name], value, rtol=0, atol=1e-5)
    assert kept[-1].final.test == every_step[-1].final.test


def test_frozen_tower_refuses_vision_prompts_that_train(fast_cfg, monkeypatch):
    monkeypatch.setitem(METHODS, "promptsrc", dataclasses.replace(METHODS["promptsrc"], images="frozen_tower"))
    cfg = fast_cfg(**SMALL, **{"method.name": "promptsrc"})
    with pytest.raises(ValueError, match="frozen_tower needs vision prompts that do not train"):
        build_run(cfg, prepare(cfg))
