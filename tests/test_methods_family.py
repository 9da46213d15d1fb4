"""SubPT+NFL, PromptSRC and CasPL against their defining rules (METHODS.md): every SubPT update in
span(U); NFL, PromptSRC's KL/L1 terms and CasPL's distillation against direct computations; the
Gaussian aggregate is the weighted mean of the per-epoch prompts; the boosting prompt does not
move in stage 2."""
import math

import numpy as np
import pytest
import torch

from gcs_tune.config import ConfigError
from gcs_tune.engine import fit
from gcs_tune.methods.averaging import GaussianAverage, gaussian_weights
from gcs_tune.methods.losses import (LossInputs, distillation, novel_features, scl_image, scl_logits,
                                     scl_text)
from gcs_tune.methods.steps import GCSAMStep, SGDStep
from gcs_tune.methods.subspace import SubspaceStep, principal_directions
from gcs_tune.methods.table import METHODS
from gcs_tune.methods.templates import IMAGENET_60
from test_steps import problem  # a small two-tensor problem with a closure

# --- SubPT ------------------------------------------------------------------------------------


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def subpt(params, inner, momentum=0.9, wd=0.0, lr=0.05, rank=3, epochs=6):
    """A SubPT rule whose pilot pass ran ``epochs`` inner steps per epoch on the same problem."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    return SubspaceStep(inner, params, opt, rank=rank, t_early=epochs)


@pytest.mark.parametrize("inner", [lambda ps, o: SGDStep(ps, o),
                                   lambda ps, o: GCSAMStep(ps, o, rho=0.1, beta1=0.5, beta2=0.8)],
                         ids=["sgd", "gcsam"])
def test_every_subpt_update_lies_in_span_u(inner):
    params, closure = problem()
    pilot = subpt(params, inner)
    for epoch in range(pilot.pilot_epochs):  # phase A: unprojected, a snapshot after each epoch
        pilot.step(closure)
        pilot.end_epoch(epoch)
    params, closure = problem()  # phase B: the same start (the run rebuilt from its seed)
    rule = subpt(params, inner)
    rule.after_pilot(pilot)
    u = rule.projected.basis
    assert u.shape == (3, 17) and torch.allclose(u @ u.t(), torch.eye(3), atol=1e-5)  # orthonormal rows
    for _ in range(5):
        before = flat(params)
        rule.step(closure)
        delta = flat(params) - before
        assert delta.norm() > 0
        assert (delta - u.t() @ (u @ delta)).norm() <= 1e-5 * delta.norm()  # momentum keeps it in span(U)


def test_weight_decay_is_added_after_the_projection():
    params, closure = problem()
    rule = subpt(params, lambda ps, o: SGDStep(ps, o), momentum=0.0, wd=0.1, lr=0.05)
    u = torch.linalg.qr(torch.randn(17, 3))[0].t()  # any orthonormal basis
    rule.projected.basis = u
    before = flat(params)
    rule.step(closure)
    delta = flat(params) - before
    decay = -0.05 * 0.1 * before  # the base optimiser's −lr·wd·θ, not projected (their code)
    assert (delta - decay - u.t() @ (u @ (delta - decay))).norm() < 1e-6
    assert (delta - u.t() @ (u @ delta)).norm() > 1e-4  # ... so the update itself leaves span(U)


def test_principal_directions_are_the_top_eigenvectors_of_the_snapshot_covariance():
    w = torch.randn(30, 12, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.1, 12, dtype=torch.float64))
    u = principal_directions(w, 4)
    centred = (w - w.mean(0)).numpy()
    vals, vecs = np.linalg.eigh(centred.T @ centred)
    top = torch.from_numpy(vecs[:, np.argsort(vals)[::-1][:4]].T.copy())
    torch.testing.assert_close(u.t() @ u, top.t() @ top)  # the same subspace (signs are free)
    with pytest.raises(ValueError):
        principal_directions(w[:3], 4)


TINY = {"data.shots": 2, "data.val_shots": 1, "data.lab_test_per_class": 1, "optim.batch_size": 64,
        "schedule.warmup_epochs": 0}  # 64 training images, one step per epoch


def test_subpt_phase_b_restarts_from_the_seed_and_moves_in_span_u(fast_cfg, monkeypatch):
    from gcs_tune.model.prompters import CoOpPrompter
    from gcs_tune.model.text import PromptedTextEncoder
    from gcs_tune.prepare import prepare
    seen = {}
    original = SubspaceStep.after_pilot

    def record(self, pilot):
        original(self, pilot)
        seen.update(basis=self.projected.basis.clone(), start=flat(self.params), pilot=list(pilot.snapshots))
    monkeypatch.setattr(SubspaceStep, "after_pilot", record)
    cfg = fast_cfg(**{**TINY, "method.name": "subpt", "schedule.epochs": 3, "method.subspace_epochs": 2,
                      "method.subspace_rank": 1, "optim.weight_decay": 0.0, "prompt.init": None, "optim.lr": 0.5})
    prep = prepare(cfg)
    last = list(fit(cfg, prep))[-1]
    bb = prep.backbone
    init = CoOpPrompter(PromptedTextEncoder(bb.model), bb.tokenizer, 4, None, 32, False,
                        torch.Generator().manual_seed(cfg.seed)).ctx.detach().reshape(-1)
    assert torch.equal(seen["start"], init)  # phase B starts from the seed's context, not phase A's end
    assert len(seen["pilot"]) == 2 and not torch.equal(seen["pilot"][0], init)
    delta = last.final.prompt["ctx"].reshape(-1) - init
    u = seen["basis"]
    assert u.shape == (1, 4 * 128) and delta.norm() > 0
    assert (delta - u.t() @ (u @ delta)).norm() <= 1e-4 * delta.norm()  # wd 0: the run moved in span(U)


# --- NFL --------------------------------------------------------------------------------------


def test_nfl_is_one_minus_cosine_to_the_zero_shot_features_of_the_extra_names():
    torch.manual_seed(0)
    extra, frozen = torch.randn(7, 16), torch.randn(7, 16)
    x = LossInputs(torch.randn(2, 16), torch.tensor([0, 1]), torch.randn(3, 16), torch.randn(3, 16), torch.tensor(10.0),
                   extra_text_feats=extra, extra_frozen_text_feats=frozen)
    direct = sum(1 - float(a @ b / (a.norm() * b.norm())) for a, b in zip(extra, frozen)) / 7
    assert math.isclose(float(novel_features(x)), direct, rel_tol=1e-5)
    nn_loss = torch.nn.CosineEmbeddingLoss()(extra, frozen, torch.ones(7))  # the authors' criterion
    assert math.isclose(float(novel_features(x)), float(nn_loss), rel_tol=1e-5)


def test_nfl_names_are_an_explicit_option(fast_cfg, tmp_path):
    with pytest.raises(ConfigError, match="nfl_names"):
        fast_cfg(**{"method.name": "subpt_nfl"})  # default none: no silent transductive use
    with pytest.raises(ConfigError, match="no such file"):
        fast_cfg(**{"method.name": "subpt_nfl", "method.nfl_names": str(tmp_path / "missing.txt")})
    names = tmp_path / "names.txt"
    names.write_text("violet hexagon\n\nbrown oval\n")
    cfg = fast_cfg(**{**TINY, "method.name": "subpt_nfl", "method.nfl_names": str(names), "schedule.epochs": 1,
                      "method.subspace_epochs": 1, "method.subspace_rank": 1})
    from gcs_tune.methods.assemble import nfl_names
    from gcs_tune.prepare import prepare
    prep = prepare(cfg)
    assert nfl_names(cfg, prep) == ["violet hexagon", "brown oval"]
    novel = cfg.replace(**{"method.nfl_names": "novel"})
    assert nfl_names(novel, prep) == list(prep.classnames[32:])
    assert cfg.to_dict()["method"]["nfl_names"] == str(names)  # in the run config: logged with it
    assert math.isfinite(list(fit(cfg, prep))[-1].train_loss)


# --- PromptSRC --------------------------------------------------------------------------------


def src_inputs(seed=0, b=5, c=4, d=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return LossInputs(r(b, d), torch.arange(b) % c, r(c, d), r(c, d), torch.tensor(20.0),
                      frozen_image_feats=r(b, d), ensemble_text_feats=r(c, d))


def unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def test_scl_logits_is_kl_of_zero_shot_to_prompted_over_batch_times_classes():
    x = src_inputs()
    p_zs = torch.softmax(20 * unit(x.frozen_image_feats) @ unit(x.ensemble_text_feats).t(), dim=-1)
    p = torch.softmax(20 * unit(x.image_feats) @ unit(x.text_feats).t(), dim=-1)
    direct = float((p_zs * (p_zs.log() - p.log())).sum()) / (5 * 4)
    assert math.isclose(float(scl_logits(x)), direct, rel_tol=1e-5)


def test_scl_l1_terms_are_mean_absolute_differences_of_normalised_features():
    x = src_inputs()
    text = float((unit(x.text_feats) - unit(x.ensemble_text_feats)).abs().mean())
    image = float((unit(x.image_feats) - unit(x.frozen_image_feats)).abs().mean())
    assert math.isclose(float(scl_text(x)), text, rel_tol=1e-6)
    assert math.isclose(float(scl_image(x)), image, rel_tol=1e-6)
    assert METHODS["promptsrc"].losses == {"ce": 1.0, "scl_logits": 1.0, "scl_text": 25.0, "scl_image": 10.0}


def test_imagenet_template_set_has_60_phrasings():
    assert len(IMAGENET_60) == len(set(IMAGENET_60)) == 60 and all(t.count("{}") == 1 for t in IMAGENET_60)
    assert IMAGENET_60[0] == "a photo of a {}." and IMAGENET_60[-1] == "itap of the {}."


def test_gaussian_weights_are_the_normalised_density():
    from scipy.stats import norm
    w = gaussian_weights(20, 15, 1)
    direct = norm.pdf(np.arange(1, 21), 15, 1)
    np.testing.assert_allclose(w, direct / direct.sum(), rtol=1e-12)
    assert max(range(20), key=w.__getitem__) == 14  # epoch 15 weighs most


def test_the_aggregate_is_the_weighted_mean_of_the_per_epoch_prompts(fast_cfg, monkeypatch):
    states = []
    original = GaussianAverage.update

    def record(self, epoch, module):
        states.append({k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad})
        original(self, epoch, module)
    monkeypatch.setattr(GaussianAverage, "update", record)
    cfg = fast_cfg(**{**TINY, "method.name": "promptsrc", "schedule.epochs": 3, "method.gpa_mean": 2.0,
                      "method.gpa_std": 1.0, "optim.lr": 0.5})
    last = list(fit(cfg))[-1]
    w = gaussian_weights(3, 2.0, 1.0)
    assert len(states) == 3
    for name in ("ctx", "text_deep", "vision"):
        direct = sum(wi * s[name].double() for wi, s in zip(w, states))
        torch.testing.assert_close(last.final.prompt[name], direct.float(), rtol=0, atol=1e-6)
        assert not torch.allclose(states[-1][name], direct.float(), atol=1e-6)  # not the last epoch's prompt


# --- CasPL ------------------------------------------------------------------------------------


def test_distillation_is_t_squared_kl_of_teacher_to_student_per_image():
    x = src_inputs(1)
    x = LossInputs(x.image_feats, x.targets, x.text_feats, x.frozen_text_feats, x.scale,
                   frozen_image_feats=x.frozen_image_feats, temperature=2.0)
    t = torch.softmax(20 * unit(x.frozen_image_feats) @ unit(x.frozen_text_feats).t() / 2, dim=-1)
    s = torch.softmax(20 * unit(x.image_feats) @ unit(x.text_feats).t() / 2, dim=-1)
    direct = float((t * (t.log() - s.log())).sum()) * 4 / 5
    assert math.isclose(float(distillation(x)), direct, rel_tol=1e-5)


CASPL_FAST = {**TINY, "method.teacher_model": "lab-vit-tiny", "method.boost_epochs": 1, "method.boost_shots": 1,
              "method.boost_batch_size": 64, "method.boost_n_ctx": 2}


@pytest.mark.parametrize("host", ["caspl_coop", "caspl_promptsrc"])
def test_the_boosting_prompt_is_unchanged_in_stage_2(fast_cfg, host):
    from gcs_tune.methods.caspl import boost_state
    from gcs_tune.model.prompters import phrase_embedding
    from gcs_tune.model.text import PromptedTextEncoder
    from gcs_tune.prepare import prepare
    cfg = fast_cfg(**{"method.name": host, **CASPL_FAST, "optim.lr": 0.5})
    prep = prepare(cfg)
    stage1 = boost_state(cfg, prep)  # trained now (random-weight teacher), then read back by fit
    last = list(fit(cfg, prep))[-1]
    prompt = last.final.prompt
    assert {k[len("boost."):] for k in prompt if k.startswith("boost.")} == set(stage1)
    for name, value in stage1.items():
        assert torch.equal(prompt[f"boost.{name}"], value.float())
    text = PromptedTextEncoder(prep.backbone.model)
    init = phrase_embedding(text, prep.backbone.tokenizer, "a photo of a")  # (4, width): the adapting context's start
    assert not torch.allclose(prompt["adapt.ctx"], init, atol=1e-4)  # ... which did train
