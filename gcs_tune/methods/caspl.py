"""CasPL's stage 1: the boosting prompt, distilled from a larger teacher CLIP.

A deep vision-language prompt on the student is trained to match the teacher's logits (KL at
temperature τ, T² scaling) on the unlabeled train images of the domain -- every train image of
every class the run may read, novel classes included in a base-to-novel run -- over the names of
those classes, scored with the student's logit scale (the authors' code). The teacher's image
features come from the feature cache of its own draws: the same crops the student's tower sees.

The stage runs once per (student, teacher, data, recipe, ``method.boost_seed``) and is cached under
``data.cache_dir``: like the authors' single stage-1 run per dataset, every seed and every host
method (CoOp, PromptSRC) of stage 2 starts from the same boosting prompt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from gcs_tune.config import BackboneConfig, RunConfig
from gcs_tune.data.cache import ids_digest
from gcs_tune.methods.loop import Run, train_epoch
from gcs_tune.methods.steps import SGDStep
from gcs_tune.methods.parts import PROMPTERS, PromptContext
from gcs_tune.model.backbone import PACKAGE_DIR, Backbone, BackboneError, load_backbone
from gcs_tune.model.deep import PromptedImageEncoder
from gcs_tune.model.precision import autocast
from gcs_tune.model.prompters import build_bank
from gcs_tune.model.text import PromptedTextEncoder
from gcs_tune.prepare import Prepared, train_features, unlabeled_train, zero_shot_text

log = logging.getLogger(__name__)
LAB_TEACHER = "lab-vit-teacher"
LAB_TEACHER_WEIGHTS = PACKAGE_DIR / "weights" / f"{LAB_TEACHER}.pt"
FORMAT_VERSION = 1


def teacher_backbone(cfg: RunConfig) -> Backbone:
    """The teacher: ``method.teacher_model`` with ``method.teacher_pretrained`` (the shipped lab
    teacher's weights when it is the lab teacher and none is named), on the run's device."""
    m = cfg.method
    pretrained = m.teacher_pretrained
    if pretrained is None and m.teacher_model == LAB_TEACHER:
        if not LAB_TEACHER_WEIGHTS.is_file():
            raise BackboneError(f"{LAB_TEACHER_WEIGHTS}: the lab teacher is missing; rebuild it with "
                                "`python pipelines/pretrain_teacher.py`")
        pretrained = str(LAB_TEACHER_WEIGHTS)
        _check_variant(cfg)
    b = cfg.backbone
    return load_backbone(BackboneConfig(model=m.teacher_model, pretrained=pretrained, device=b.device,
                                        precision=b.precision, cache_dir=b.cache_dir))


def _check_variant(cfg: RunConfig) -> None:
    """The lab teacher's web held one downstream variant: on another it knows nothing the student
    does not, and says so in the log."""
    meta = LAB_TEACHER_WEIGHTS.with_suffix(".json")
    variant = json.loads(meta.read_text()).get("variant") if meta.is_file() else None
    if cfg.data.dataset == "lab" and variant and variant != cfg.data.lab_variant:
        log.warning("the lab teacher was pre-trained with the downstream variant %s, this run uses %s: "
                    "it teaches little here", variant, cfg.data.lab_variant)


def stage_config(cfg: RunConfig) -> RunConfig:
    """Stage 1's recipe: its own seed, epochs, batch size and learning rate; the rest the run's."""
    m = cfg.method
    return cfg.replace(**{"seed": m.boost_seed, "schedule.epochs": m.boost_epochs, "optim.lr": m.boost_lr,
                          "optim.batch_size": m.boost_batch_size})


def _key(stage: RunConfig, prep: Prepared, teacher: Backbone, ids: tuple[str, ...]) -> dict:
    """Everything that decides the boosting prompt."""
    return {"format": FORMAT_VERSION, "student": [prep.backbone.name, prep.backbone.weights, prep.backbone.quick_gelu],
            "teacher": [teacher.name, teacher.weights, teacher.quick_gelu], "classnames": list(prep.classnames),
            "template": prep.template, "images": ids_digest(ids), "data": stage.data.model_dump(mode="json"),
            "prompt": stage.prompt.model_dump(mode="json"), "method": stage.method.model_dump(mode="json"),
            "optim": stage.optim.model_dump(mode="json"), "schedule": stage.schedule.model_dump(mode="json"),
            "precision": stage.backbone.precision, "seed": stage.seed}


def boost_state(cfg: RunConfig, prep: Prepared) -> dict[str, torch.Tensor]:
    """The boosting prompt's tensors (a :class:`DeepPrompter` state dict), trained or read back."""
    stage = stage_config(cfg)
    images = unlabeled_train(stage, stage.method.boost_shots)
    teacher = teacher_backbone(stage)
    key = _key(stage, prep, teacher, images.ids)
    keep = {k: v for k, v in key["method"].items() if k.startswith(("boost_", "teacher_", "kd_"))}
    key["method"] = keep  # the host's knobs (ρ, λ, ...) do not change stage 1
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(stage.data.cache_dir).expanduser() / f"boost-{digest}.pt"
    if path.is_file():
        log.info("CasPL stage 1: boosting prompt read from %s", path)
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    state = _train(stage, prep, teacher, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves no half file under the trusted name
    log.info("CasPL stage 1: %d epochs in %.1f s, saved %s", stage.schedule.epochs, time.perf_counter() - start, path)
    return state


def _train(stage: RunConfig, prep: Prepared, teacher: Backbone, images) -> dict[str, torch.Tensor]:
    from gcs_tune.methods.assemble import tower_source  # late: assemble imports this module

    bb, device = prep.backbone, prep.backbone.device
    names = list(prep.classnames)  # the teacher scores every class the run knows
    reference = train_features(teacher, stage, images)  # the teacher's features of every draw (cached)
    torch.manual_seed(stage.seed)
    gen = torch.Generator().manual_seed(stage.seed)
    text, image = PromptedTextEncoder(bb.model), PromptedImageEncoder(bb.model)
    prompter = PROMPTERS["boost"](PromptContext(stage, text, image, bb.tokenizer, len(names), gen))
    bank = build_bank(text, bb.tokenizer, names, list(range(len(names))), prompter.n_ctx)
    params = [p for p in prompter.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=stage.optim.lr, momentum=stage.optim.momentum,
                                weight_decay=stage.optim.weight_decay)
    precision = autocast(device, stage.backbone.precision)
    fixed = {"temperature": stage.method.kd_temperature}
    run = Run(cfg=stage, prompter=prompter, encoder=text, train_bank=bank, eval_bank=bank,
              source=tower_source(stage, bb, image, reference, images, {}, stage.seed), step=SGDStep(params, optimizer),
              optimizer=optimizer, weights={"distill": 1.0},
              frozen_text=zero_shot_text(teacher, names, prep.template),  # (C, D_teacher) the teacher's text
              scale=bb.model.logit_scale.exp().detach(), label_offset=0, generator=gen, train_precision=precision,
              precision=precision, extras=lambda batch: {**fixed, "frozen_image_feats": batch.frozen})
    for epoch in range(stage.schedule.epochs):
        loss = train_epoch(run, epoch)
        log.info("CasPL stage 1: epoch %d/%d, distillation loss %.4f", epoch + 1, stage.schedule.epochs, loss)
        if loss != loss or abs(loss) == float("inf"):
            raise FloatingPointError(f"CasPL stage 1 diverged at epoch {epoch + 1} (method.boost_lr={stage.optim.lr})")
    return {k: v.detach().cpu().clone() for k, v in prompter.state_dict().items()}


STAGES = {"boost": boost_state}  # Method.stage -> (run config, prepared) -> the state the row's prompter starts from
