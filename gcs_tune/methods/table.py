"""The methods table: a method is a row (prompter × step rule × loss terms × image features ×
averaging, plus a stage run before it), never a trainer.

The engine looks every part up by the row's keys and never branches on a method's name:
- ``prompter``: key of PROMPTERS (what is trained);
- ``step``: key of STEP_RULES (how a gradient becomes an update; SubPT's "subspace" wraps another);
- ``losses``: LOSS_TERMS key -> default weight (gcs_tune.methods.losses);
- ``images``: "cache" (frozen features read from the feature cache) or "tower" (the image tower
  run with the prompter's vision prompts on fresh crops: gcs_tune.methods.sources);
- ``averaging``: "none" or "gaussian" (PromptSRC's prompt aggregation: gcs_tune.methods.averaging);
- ``stage``: None, or "boost": CasPL's stage 1, whose boosting prompt the prompter cascades.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from gcs_tune.methods.averaging import GaussianAverage, NoAveraging
from gcs_tune.methods.steps import GCSAMStep, SAMStep, SGDStep
from gcs_tune.methods.subspace import SubspaceStep
from gcs_tune.model.deep import PromptedImageEncoder
from gcs_tune.model.deep_prompters import CascadePrompter, DeepPrompter
from gcs_tune.model.prompters import CoOpPrompter
from gcs_tune.model.text import PromptedTextEncoder

if TYPE_CHECKING:  # the config validates method names against this table
    from gcs_tune.config import RunConfig

log = logging.getLogger(__name__)
Rule = Callable[["RunConfig", list, torch.optim.Optimizer], SGDStep]


def _subspace(cfg: "RunConfig", params: list, opt) -> SubspaceStep:
    """SubPT around the rule ``method.subspace_inner`` names. Phase A cannot outlast the run it
    pilots: t_early (and r with it) is clipped to the run's epochs."""
    m = cfg.method
    t_early = min(m.subspace_epochs, cfg.schedule.epochs)
    rank = min(m.subspace_rank, t_early)
    if (t_early, rank) != (m.subspace_epochs, m.subspace_rank):
        log.warning("SubPT: t_early %d, r %d clipped to %d, %d by a %d-epoch run", m.subspace_epochs,
                    m.subspace_rank, t_early, rank, cfg.schedule.epochs)
    return SubspaceStep(lambda ps, o: STEP_RULES[m.subspace_inner](cfg, ps, o), params, opt, rank, t_early)


# (run config, trainable parameters, base optimiser) -> step rule
STEP_RULES: dict[str, Rule] = {
    "sgd": lambda cfg, params, opt: SGDStep(params, opt),
    "sam": lambda cfg, params, opt: SAMStep(params, opt, cfg.method.rho),
    "gcsam": lambda cfg, params, opt: GCSAMStep(params, opt, cfg.method.rho, cfg.method.beta1,
                                                cfg.method.beta2, cfg.method.cos_scope),
    "subspace": _subspace,
}


@dataclass(frozen=True)
class PromptContext:
    """What a prompter factory may use."""

    cfg: "RunConfig"
    text: PromptedTextEncoder
    image: PromptedImageEncoder | None  # None when the row reads cached image features
    tokenizer: Callable
    n_train_classes: int
    generator: torch.Generator
    prior: dict[str, torch.Tensor] | None = None  # the state the row's stage produced (None on resume)


def _coop(c: PromptContext) -> CoOpPrompter:
    p = c.cfg.prompt
    return CoOpPrompter(c.text, c.tokenizer, p.n_ctx, p.init, c.n_train_classes, p.class_specific, c.generator)


def _deep(c: PromptContext) -> DeepPrompter:
    p = c.cfg.prompt
    return DeepPrompter(c.text, c.image, c.tokenizer, p.n_ctx, p.init, p.n_ctx_vision, p.depth, c.generator)


def _boost(c: PromptContext, generator: torch.Generator | None = None) -> DeepPrompter:
    """CasPL's boosting prompt: as many vision as text tokens; the phrase initialises it only when
    it has at most 4 tokens, else N(0, 0.02) (the authors' rule)."""
    m, p = c.cfg.method, c.cfg.prompt
    init = p.init if m.boost_n_ctx <= 4 else None
    return DeepPrompter(c.text, c.image, c.tokenizer, m.boost_n_ctx, init, m.boost_n_ctx, m.boost_depth,
                        generator or c.generator)


def _cascade(host: Callable[[PromptContext], torch.nn.Module]):
    def build(c: PromptContext) -> CascadePrompter:
        boost = _boost(c, torch.Generator().manual_seed(0))  # placeholder values, replaced just below:
        if c.prior is not None:  # None: a resumed run, whose saved prompter state replaces them
            boost.load_state_dict(c.prior)  # the run's own generator stays untouched
        return CascadePrompter(boost, host(c))
    return build


# PromptContext -> prompter
PROMPTERS: dict[str, Callable[[PromptContext], torch.nn.Module]] = {
    "coop": _coop, "deep": _deep, "boost": _boost, "cascade_coop": _cascade(_coop), "cascade_deep": _cascade(_deep),
}
AVERAGING: dict[str, Callable[["RunConfig"], NoAveraging]] = {
    "none": lambda cfg: NoAveraging(),
    "gaussian": lambda cfg: GaussianAverage(cfg.schedule.epochs, cfg.method.gpa_mean, cfg.method.gpa_std),
}


@dataclass(frozen=True)
class Method:
    name: str
    prompter: str  # key of PROMPTERS
    step: str  # key of STEP_RULES
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})  # LOSS_TERMS key -> default weight
    summary: str = ""
    knobs: tuple[str, ...] = ()  # method.* config keys this method reads (for search validation)
    images: str = "cache"  # "cache" | "tower"
    averaging: str = "none"  # key of AVERAGING
    stage: str | None = None  # "boost": CasPL's stage 1 runs first (gcs_tune.methods.caspl)


SAM_KNOBS = ("rho", "beta1", "beta2", "cos_scope", "grad_precision")
SUBPT_KNOBS = ("subspace_rank", "subspace_epochs", "subspace_inner", *SAM_KNOBS)
SRC_LOSSES = {"ce": 1.0, "scl_logits": 1.0, "scl_text": 25.0, "scl_image": 10.0}
SRC_KNOBS = ("scl_text_weight", "scl_image_weight", "gpa_mean", "gpa_std")
CASPL_KNOBS = ("teacher_model", "teacher_pretrained", "kd_temperature", "boost_n_ctx", "boost_depth",
               "boost_epochs", "boost_batch_size", "boost_lr", "boost_seed", "boost_shots")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("coop", "coop", "sgd", summary="CoOp: learnable context, cross-entropy, SGD"),
    Method("sam_coop", "coop", "sam", summary="CoOp trained with SAM (two passes, step with g_s)",
           knobs=("rho", "grad_precision")),
    Method("gcscoop", "coop", "gcsam", knobs=SAM_KNOBS,
           summary="GCSCoOp: SAM's two passes, per-step choice of g / projection / g_s"),
    Method("kgcoop", "coop", "sgd", losses={"ce": 1.0, "kg": 8.0}, knobs=("kg_weight",),
           summary="KgCoOp: CoOp + λ·(1 − cos) to the hand-crafted prompt's text features"),
    Method("subpt", "coop", "subspace", knobs=SUBPT_KNOBS,
           summary="SubPT: CoOp with every gradient projected on the top-r PCA of the first t_early epochs' contexts"),
    Method("subpt_nfl", "coop", "subspace", losses={"ce": 1.0, "nfl": 1.0},
           knobs=(*SUBPT_KNOBS, "nfl_names", "nfl_weight"),
           summary="SubPT + NFL: and λ·(1 − cos) to the zero-shot text features of extra class names"),
    Method("promptsrc", "deep", "sgd", losses=SRC_LOSSES, images="tower", averaging="gaussian", knobs=SRC_KNOBS,
           summary="PromptSRC: deep V-L prompts, CE + KL + L1 to the frozen model, Gaussian prompt aggregation"),
    Method("promptsrc_gcsam", "deep", "gcsam", losses=SRC_LOSSES, images="tower", averaging="gaussian",
           knobs=(*SRC_KNOBS, *SAM_KNOBS), summary="PromptSRC's prompts and losses trained with GCSAM"),
    Method("caspl_coop", "cascade_coop", "sgd", images="tower", stage="boost", knobs=CASPL_KNOBS,
           summary="CasPL + CoOp: a frozen boosting prompt distilled from a larger teacher, CoOp cascaded after it"),
    Method("caspl_promptsrc", "cascade_deep", "sgd", losses=SRC_LOSSES, images="tower", averaging="gaussian",
           stage="boost", knobs=(*CASPL_KNOBS, *SRC_KNOBS),
           summary="CasPL + PromptSRC: the boosting prompt, PromptSRC's prompts and recipe cascaded after it"),
)}
