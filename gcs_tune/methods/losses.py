"""Loss terms. Each reads what it needs from one :class:`LossInputs` and returns a scalar; the
methods table says which terms a method sums and with what weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossInputs:
    image_feats: torch.Tensor  # (B, D) frozen image features of the batch
    targets: torch.Tensor  # (B,) indices into the training classes
    text_feats: torch.Tensor  # (C, D) prompted text features of the training classes
    frozen_text_feats: torch.Tensor  # (C, D) hand-crafted prompt's features, same classes
    scale: torch.Tensor  # CLIP's logit scale (exp of the learned temperature)


def logits(image_feats: torch.Tensor, text_feats: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, D) image, (C, D) text -> (B, C) scaled cosine similarities."""
    return scale * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()


def cross_entropy(x: LossInputs) -> torch.Tensor:
    return F.cross_entropy(logits(x.image_feats, x.text_feats, x.scale).float(), x.targets)


def text_consistency(x: LossInputs) -> torch.Tensor:
    """KgCoOp / NFL: mean over classes of 1 − cos(prompted, hand-crafted frozen) text features."""
    text = x.text_feats.float()
    return (1 - F.cosine_similarity(text, x.frozen_text_feats.to(text.dtype), dim=-1)).mean()


LOSS_TERMS = {"ce": cross_entropy, "kg": text_consistency}
