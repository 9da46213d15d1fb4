"""The methods table: a method is a row (prompter × step rule × loss terms), not a trainer.

Adding PromptSRC, SubPT+NFL or CasPL means adding a prompter, a step rule or a loss term and a
row here; the training loop never branches on a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    prompter: str  # "coop"
    step: str  # "sgd" | "sam" | "gcsam"
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})  # term -> default weight
    summary: str = ""
    knobs: tuple[str, ...] = ()  # method.* config keys this method reads (for search validation)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("coop", "coop", "sgd", summary="CoOp: learnable context, cross-entropy, SGD"),
    Method("sam_coop", "coop", "sam", summary="CoOp trained with SAM (two passes, step with g_s)",
           knobs=("rho",)),
    Method("gcscoop", "coop", "gcsam", knobs=("rho", "beta1", "beta2"),
           summary="GCSCoOp: SAM's two passes, per-step choice of g / projection / g_s"),
    Method("kgcoop", "coop", "sgd", losses={"ce": 1.0, "kg": 8.0}, knobs=("kg_weight",),
           summary="KgCoOp: CoOp + λ·(1 − cos) to the hand-crafted prompt's text features"),
)}
