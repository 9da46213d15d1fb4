"""Build the :class:`~gcs_tune.methods.loop.Run` of a method's row: look up its prompter, step
rule, loss terms, image source and averaging, and compute once what its loss terms read."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from gcs_tune.config import RunConfig
from gcs_tune.data.augment import SeededAugment
from gcs_tune.data.extract import default_workers
from gcs_tune.methods import caspl
from gcs_tune.methods.loop import Extras, Run
from gcs_tune.methods.losses import NEEDS
from gcs_tune.methods.sources import CachedImages, FrozenTowerImages, TowerImages
from gcs_tune.methods.parts import AVERAGING, PROMPTERS, STEP_RULES, PromptContext
from gcs_tune.methods.table import METHODS
from gcs_tune.methods.templates import ensemble_templates, ensemble_text
from gcs_tune.model.backbone import Backbone
from gcs_tune.model.deep import PromptedImageEncoder
from gcs_tune.model.precision import autocast, fp32
from gcs_tune.model.prompters import build_bank
from gcs_tune.model.text import PromptedTextEncoder
from gcs_tune.prepare import Prepared, TrainFeatures, zero_shot_text

log = logging.getLogger(__name__)
# A weight the config may override: loss term -> method.* knob
WEIGHT_KNOBS = {"kg": "kg_weight", "nfl": "nfl_weight", "scl_text": "scl_text_weight", "scl_image": "scl_image_weight"}


def loss_weights(cfg: RunConfig) -> dict[str, float]:
    weights = dict(METHODS[cfg.method.name].losses)
    for term, knob in WEIGHT_KNOBS.items():
        if term in weights and getattr(cfg.method, knob) is not None:
            weights[term] = getattr(cfg.method, knob)
    return {k: w for k, w in weights.items() if w > 0}


def tower_source(cfg: RunConfig, bb: Backbone, encoder: PromptedImageEncoder, reference: TrainFeatures,
                 images, eval_images: dict, seed: int) -> TowerImages:
    """The per-image path over ``images`` (the crops of ``reference``'s draws, same seed)."""
    augment = SeededAugment(bb.image_size, cfg.data.crop_scale_resolved, bb.mean, bb.std)
    workers = 0 if cfg.data.dataset == "lab" else default_workers()  # lab images render in microseconds
    return TowerImages(encoder, reference, images, eval_images, augment, bb.eval_transform, seed, bb.device, workers)


def _source(images: str, cfg: RunConfig, prep: Prepared, image: PromptedImageEncoder | None,
            prompter: torch.nn.Module, precision):
    """The image source a row's ``images`` names."""
    if images == "cache":
        return CachedImages(prep.train, {"val": prep.val, "test": prep.test})
    evals = {k: v for k, v in prep.images.items() if k in ("val", "test")}
    tower = tower_source(cfg, prep.backbone, image, prep.train, prep.images["train"], evals, prep.seed)
    return FrozenTowerImages(tower, prompter, precision) if images == "frozen_tower" else tower


def nfl_names(cfg: RunConfig, prep: Prepared) -> list[str]:
    """NFL's extra class names: the run's held-out names (``novel``), or a file's lines."""
    source = cfg.method.nfl_names
    if source == "novel":
        names = list(prep.classnames[prep.novel.start:prep.novel.stop])
    else:
        names = [line.strip() for line in Path(source).expanduser().read_text().splitlines() if line.strip()]
    log.info("NFL: %d extra class names from %s (method.nfl_names)", len(names), source)
    return names


def _extras(cfg: RunConfig, prep: Prepared, weights: dict[str, float], text: PromptedTextEncoder,
            prompter: torch.nn.Module) -> Extras:
    """The optional loss inputs the row's terms read: fixed ones computed now, per-batch ones as
    functions called inside the loss closure (so a two-pass rule recomputes them at θ + ε)."""
    needs = frozenset().union(*(NEEDS[name] for name in weights))
    bb, base = prep.backbone, prep.base
    fixed, per_batch = {}, {}
    if "frozen_image_feats" in needs:
        per_batch["frozen_image_feats"] = lambda b: b.frozen
    if "ensemble_text_feats" in needs:
        names = list(prep.classnames[base.start:base.stop])
        templates = ensemble_templates(cfg.data.dataset, prep.template)
        fixed["ensemble_text_feats"] = ensemble_text(bb.model, bb.tokenizer, names, templates, bb.device)
    if "extra_text_feats" in needs:
        names = nfl_names(cfg, prep)
        labels = list(range(len(prep.classnames), len(prep.classnames) + len(names)))  # never trained on
        bank = build_bank(text, bb.tokenizer, names, labels, prompter.n_ctx)
        per_batch["extra_text_feats"] = lambda b: prompter.text_features(text, bank)
        fixed["extra_frozen_text_feats"] = zero_shot_text(bb, names, prep.template)
    if "temperature" in needs:
        fixed["temperature"] = cfg.method.kd_temperature
    if not needs:
        return lambda batch: {}
    return lambda batch: {**fixed, **{k: f(batch) for k, f in per_batch.items()}}


def build_run(cfg: RunConfig, prep: Prepared, state: dict | None = None) -> Run:
    """The run of ``cfg``'s row, from its seed (after the row's stage, which has its own seed), or
    continued from ``state`` (a :meth:`Run.state_dict`). A resumed run skips the stage: what it
    produced (CasPL's boosting prompt) is part of the saved prompter, and re-running it would load
    the teacher and, on a node without the stage's cache, train it again."""
    row = METHODS[cfg.method.name]
    prior = caspl.STAGES[row.stage](cfg, prep) if row.stage and state is None else None
    bb, device = prep.backbone, prep.backbone.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    text = PromptedTextEncoder(bb.model)
    image = PromptedImageEncoder(bb.model) if row.images != "cache" else None
    names = list(prep.classnames)
    prompter = PROMPTERS[row.prompter](PromptContext(cfg, text, image, bb.tokenizer, len(prep.base), gen, prior))
    train_bank = build_bank(text, bb.tokenizer, names[prep.base.start:prep.base.stop], list(prep.base),
                            prompter.n_ctx)
    eval_bank = build_bank(text, bb.tokenizer, names, list(range(len(names))), prompter.n_ctx)
    params = [p for p in prompter.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    step = STEP_RULES[row.step](cfg, params, optimizer)
    weights = loss_weights(cfg)
    exact = step.two_pass and cfg.method.grad_precision == "fp32"  # the SAM family compares g_s with g
    train_precision = fp32(device) if exact else autocast(device, cfg.backbone.precision)
    source = _source(row.images, cfg, prep, image, prompter, train_precision)
    run = Run(cfg=cfg, prompter=prompter, encoder=text, train_bank=train_bank, eval_bank=eval_bank,
              source=source, step=step, optimizer=optimizer, weights=weights,
              frozen_text=prep.zero_shot_text[prep.base.start:prep.base.stop],
              scale=bb.model.logit_scale.exp().detach(), label_offset=prep.base.start, generator=gen,
              train_precision=train_precision,
              precision=autocast(device, cfg.backbone.precision), extras=_extras(cfg, prep, weights, text, prompter),
              averaging=AVERAGING[row.averaging](cfg))
    if state is not None:
        run.load_state_dict(state)
    return run

