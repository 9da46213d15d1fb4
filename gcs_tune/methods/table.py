"""The methods table: a method is a row (prompter × step rule × loss terms × image features ×
averaging, plus a stage run before it), never a trainer.

Torch-free, so the config can check a method name at load. The engine looks every part up by
the row's keys in ``gcs_tune.methods.parts`` and never branches on a method's name:
- ``prompter``: key of PROMPTERS (what is trained);
- ``step``: key of STEP_RULES (how a gradient becomes an update; SubPT's "subspace" wraps another);
- ``losses``: LOSS_TERMS key -> default weight (gcs_tune.methods.losses);
- ``images``: "cache" (frozen features read from the feature cache), "tower" (the image tower
  run with the prompter's vision prompts on fresh crops: gcs_tune.methods.sources) or
  "frozen_tower" (vision prompts that never train, as CasPL's boosting prompt under a text-only
  host: each crop through the prompted tower once, then read as a cache);
- ``averaging``: "none" or "gaussian" (PromptSRC's prompt aggregation: gcs_tune.methods.averaging);
- ``stage``: None, or "boost": CasPL's stage 1, whose boosting prompt the prompter cascades.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    prompter: str  # key of PROMPTERS
    step: str  # key of STEP_RULES
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})  # LOSS_TERMS key -> default weight
    summary: str = ""
    knobs: tuple[str, ...] = ()  # method.* config keys this method reads (for search validation)
    images: str = "cache"  # "cache" | "tower" | "frozen_tower"
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
    Method("caspl_coop", "cascade_coop", "sgd", images="frozen_tower", stage="boost", knobs=CASPL_KNOBS,
           summary="CasPL + CoOp: a frozen boosting prompt distilled from a larger teacher, CoOp cascaded after it"),
    Method("caspl_promptsrc", "cascade_deep", "sgd", losses=SRC_LOSSES, images="tower", averaging="gaussian",
           stage="boost", knobs=(*CASPL_KNOBS, *SRC_KNOBS),
           summary="CasPL + PromptSRC: the boosting prompt, PromptSRC's prompts and recipe cascaded after it"),
)}
