"""Template sets for frozen text targets that average over phrasings ("textual diversity").

PromptSRC's frozen text feature of a class is the mean of the frozen text encoder's features over
the first 60 of the 80 ImageNet prompt templates of CLIP's prompt-engineering notebook, for every
dataset, then L2-normalised. The lab CLIP was pre-trained on a single phrasing, so its set is that
one template (the others would measure its ignorance of them, not the class).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The first 60 of CLIP's 80 ImageNet templates, in the notebook's order.
IMAGENET_60: tuple[str, ...] = tuple(f"{t}." for t in (
    "a photo of a {}", "a bad photo of a {}", "a photo of many {}", "a sculpture of a {}",
    "a photo of the hard to see {}", "a low resolution photo of the {}", "a rendering of a {}",
    "graffiti of a {}", "a bad photo of the {}", "a cropped photo of the {}", "a tattoo of a {}",
    "the embroidered {}", "a photo of a hard to see {}", "a bright photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a drawing of a {}", "a photo of my {}", "the plastic {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a black and white photo of the {}",
    "a painting of the {}", "a painting of a {}", "a pixelated photo of the {}", "a sculpture of the {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a plastic {}", "a photo of the dirty {}",
    "a jpeg corrupted photo of a {}", "a blurry photo of the {}", "a photo of the {}", "a good photo of the {}",
    "a rendering of the {}", "a {} in a video game", "a photo of one {}", "a doodle of a {}",
    "a close-up photo of the {}", "the origami {}", "the {} in a video game", "a sketch of a {}",
    "a doodle of the {}", "a origami {}", "a low resolution photo of a {}", "the toy {}",
    "a rendition of the {}", "a photo of the clean {}", "a photo of a large {}", "a rendition of a {}",
    "a photo of a nice {}", "a photo of a weird {}", "a blurry photo of a {}", "a cartoon {}", "art of a {}",
    "a sketch of the {}", "a embroidered {}", "a pixelated photo of a {}", "itap of the {}",
))


def ensemble_templates(dataset: str, template: str) -> tuple[str, ...]:
    """The template set of a dataset's frozen text target: the lab's own template, else the 60."""
    return (template,) if dataset == "lab" else IMAGENET_60


@torch.no_grad()
def ensemble_text(model, tokenizer, classnames: list[str], templates: tuple[str, ...],
                  device: torch.device) -> torch.Tensor:
    """(C, D): per class, the mean over ``templates`` of open_clip's ``encode_text`` (fp32,
    unnormalised, as PromptSRC averages), then L2-normalised."""
    total = None
    for template in templates:
        feats = model.encode_text(tokenizer([template.format(c) for c in classnames]).to(device)).float()
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)
