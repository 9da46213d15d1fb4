"""What a method's row names, by key: step rules, prompters and averaging (the rows themselves are
in ``gcs_tune.methods.table``, torch-free)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from gcs_tune.methods.averaging import GaussianAverage, NoAveraging
from gcs_tune.methods.steps import GCSAMStep, SAMStep, SGDStep
from gcs_tune.methods.subspace import SubspaceStep
from gcs_tune.model.deep import PromptedImageEncoder
from gcs_tune.model.deep_prompters import CascadePrompter, DeepPrompter
from gcs_tune.model.prompters import CoOpPrompter
from gcs_tune.model.text import PromptedTextEncoder

if TYPE_CHECKING:
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
