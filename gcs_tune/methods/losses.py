"""Loss terms. Each reads what it needs from one :class:`LossInputs` and returns a scalar; the
methods table says which terms a method sums and with what weight, and :data:`NEEDS` which
optional inputs a term reads (the loop computes only those)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossInputs:
    image_feats: torch.Tensor  # (B, D) image features of the batch: the cache, or the prompted tower
    targets: torch.Tensor  # (B,) indices into the training classes
    text_feats: torch.Tensor  # (C, D) prompted text features of the training classes
    frozen_text_feats: torch.Tensor  # (C, D) the reference model's text features of the same classes
    scale: torch.Tensor  # CLIP's logit scale (exp of the learned temperature)
    # Optional, filled only for the terms that read them (NEEDS):
    frozen_image_feats: torch.Tensor | None = None  # (B, D) the reference tower on the same crops (cache)
    ensemble_text_feats: torch.Tensor | None = None  # (C, D) frozen features, mean over a template set
    extra_text_feats: torch.Tensor | None = None  # (E, D) prompted features of extra class names (NFL)
    extra_frozen_text_feats: torch.Tensor | None = None  # (E, D) zero-shot features of those names
    temperature: float = 1.0  # distillation temperature


def logits(image_feats: torch.Tensor, text_feats: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, D) image, (C, D) text -> (B, C) scaled cosine similarities."""
    return scale * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()


def cross_entropy(x: LossInputs) -> torch.Tensor:
    return F.cross_entropy(logits(x.image_feats, x.text_feats, x.scale).float(), x.targets)


def _cosine_distance(prompted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 − cos(prompted, frozen), in fp32."""
    prompted = prompted.float()
    return (1 - F.cosine_similarity(prompted, frozen.to(prompted.dtype), dim=-1)).mean()


def text_consistency(x: LossInputs) -> torch.Tensor:
    """KgCoOp: mean over classes of 1 − cos(prompted, hand-crafted frozen) text features."""
    return _cosine_distance(x.text_feats, x.frozen_text_feats)


def novel_features(x: LossInputs) -> torch.Tensor:
    """SubPT's NFL: mean over the extra names of 1 − cos(prompted, zero-shot) text features
    (their ``CosineEmbeddingLoss`` with target 1). No image is involved."""
    return _cosine_distance(x.extra_text_feats, x.extra_frozen_text_feats)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of KL(softmax(teacher) ‖ softmax(student)), in fp32."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction="sum", log_target=True)


def scl_logits(x: LossInputs) -> torch.Tensor:
    """PromptSRC's L_SCL-logits: KL(zero-shot ‖ prompted) at T = 1 over the batch, divided by
    batch × classes, the zero-shot logits from the frozen image features and the template-ensemble
    text features."""
    prompted = logits(x.image_feats, x.text_feats, x.scale)  # (B, C)
    zero_shot = logits(x.frozen_image_feats, x.ensemble_text_feats, x.scale).detach()
    return _kl(zero_shot, prompted) / prompted.numel()


def scl_text(x: LossInputs) -> torch.Tensor:
    """PromptSRC's L_SCL-text: mean |prompted − frozen| over the L2-normalised text features."""
    return F.l1_loss(F.normalize(x.text_feats.float(), dim=-1), F.normalize(x.ensemble_text_feats.float(), dim=-1))


def scl_image(x: LossInputs) -> torch.Tensor:
    """PromptSRC's L_SCL-image: mean |prompted − frozen| over the L2-normalised image features."""
    return F.l1_loss(F.normalize(x.image_feats.float(), dim=-1), F.normalize(x.frozen_image_feats.float(), dim=-1))


def distillation(x: LossInputs) -> torch.Tensor:
    """CasPL stage 1: KL(softmax(teacher / T) ‖ softmax(student / T)) · T² / batch. The teacher's
    logits are its own image and text features scored with the student's logit scale, as theirs."""
    t = x.temperature
    teacher = logits(x.frozen_image_feats, x.frozen_text_feats, x.scale).detach()
    student = logits(x.image_feats, x.text_feats, x.scale)
    return _kl(teacher / t, student / t) * t * t / student.shape[0]


LOSS_TERMS = {"ce": cross_entropy, "kg": text_consistency, "nfl": novel_features, "scl_logits": scl_logits,
              "scl_text": scl_text, "scl_image": scl_image, "distill": distillation}
# Optional LossInputs fields each term reads; the loop fills only these.
NEEDS: dict[str, frozenset[str]] = {
    "ce": frozenset(), "kg": frozenset(),
    "nfl": frozenset({"extra_text_feats", "extra_frozen_text_feats"}),
    "scl_logits": frozenset({"frozen_image_feats", "ensemble_text_feats"}),
    "scl_text": frozenset({"ensemble_text_feats"}),
    "scl_image": frozenset({"frozen_image_feats"}),
    "distill": frozenset({"frozen_image_feats", "temperature"}),
}
