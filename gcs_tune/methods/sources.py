"""The image-feature seam: "image features of this batch / this split", from the cache or from the
image tower run with the prompter's vision prompts. The method's row picks one (``images``).

Interface (what the loop and the engine call):
- ``len(source)``: the number of training images;
- ``begin_epoch(epoch, generator)``: this epoch's augmented draw of every training image;
- ``batch(idx) -> ImageBatch``: the labels, the frozen features and (tower) the pixels of rows
  ``idx``; drawn once per step, so a two-pass rule sees the same crops twice;
- ``features(batch, prompter) -> (B, D)``: the features the loss scores; called inside the loss
  closure, so the tower path is re-run at θ + ε by the SAM family;
- ``split(name, prompter) -> SplitFeatures``: features of "val" / "test" for evaluation.

Both paths show the same crops: draw d of an image is a function of (seed, image id, d)
(:mod:`gcs_tune.data.augment`), and the tower path reads the draw index the cache path would have
picked. The frozen features of a batch (PromptSRC's L1 target, the zero-shot logits, CasPL's
teacher) always come from a cache: the reference tower never runs during training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gcs_tune.data.augment import SeededAugment, draw_rng
from gcs_tune.data.extract import encode_images
from gcs_tune.data.types import ImageSet
from gcs_tune.model.deep import PromptedImageEncoder
from gcs_tune.prepare import SplitFeatures, TrainFeatures


@dataclass(frozen=True)
class ImageBatch:
    labels: torch.Tensor  # (B,) dataset labels
    frozen: torch.Tensor  # (B, D) normalised features of the frozen reference tower on these crops
    pixels: torch.Tensor | None = None  # (B, 3, H, W) the crops, for the tower path


class CachedImages:
    """Text-only prompts: the frozen tower's cached features are the features (no pixels)."""

    def __init__(self, train: TrainFeatures, splits: dict[str, SplitFeatures | None]):
        self.train, self.splits = train, splits
        self.feats: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.train.labels.shape[0]  # training images

    def begin_epoch(self, epoch: int, generator: torch.Generator) -> None:
        self.feats = self.train.epoch(epoch, generator)  # (N, D)

    def batch(self, idx: torch.Tensor) -> ImageBatch:
        return ImageBatch(self.train.labels[idx], self.feats[idx])

    def features(self, batch: ImageBatch, prompter: nn.Module) -> torch.Tensor:
        return batch.frozen

    def split(self, name: str, prompter: nn.Module) -> SplitFeatures:
        return self.splits[name]


class TowerImages:
    """Prompts that change the image features: the tower runs with ``prompter.image_features`` on
    fresh crops of the draws the cache would have shown; ``reference`` gives their frozen features
    (the student's own cache, or a teacher's for CasPL's stage 1)."""

    def __init__(self, encoder: PromptedImageEncoder, reference: TrainFeatures, images: ImageSet,
                 eval_images: dict[str, ImageSet], augment: SeededAugment, eval_transform: Callable,
                 seed: int, device: torch.device, workers: int = 0):
        self.encoder, self.reference, self.images = encoder, reference, images
        self.eval_images, self.augment, self.eval_transform = eval_images, augment, eval_transform
        self.seed, self.device, self.workers = seed, device, workers
        index = {image_id: i for i, image_id in enumerate(images.ids)}
        self.ids = reference.store.ids()  # the cache's row order (the images that decoded)
        self.rows = [index[image_id] for image_id in self.ids]  # cache row -> index in ``images``
        self.draws: torch.Tensor | None = None
        self.frozen: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.reference.labels.shape[0]  # training images

    def begin_epoch(self, epoch: int, generator: torch.Generator) -> None:
        self.draws = self.reference.draws(epoch, generator)  # (N,) the cache path's pick, same RNG use
        self.frozen = self.reference.features(self.draws)  # (N, D)

    def pixels(self, rows: list[int]) -> torch.Tensor:
        """(B, 3, H, W) crops of cache rows ``rows`` in this epoch's draws."""
        crops = [self.augment(self.images.load(self.rows[r]), draw_rng(self.seed, self.ids[r], int(self.draws[r])))
                 for r in rows]
        return torch.stack(crops).to(self.device, non_blocking=True)

    def batch(self, idx: torch.Tensor) -> ImageBatch:
        return ImageBatch(self.reference.labels[idx], self.frozen[idx], self.pixels(idx.tolist()))

    def features(self, batch: ImageBatch, prompter: nn.Module) -> torch.Tensor:
        return prompter.image_features(self.encoder, batch.pixels)  # (B, D), with grad to the prompts

    @torch.no_grad()
    def split(self, name: str, prompter: nn.Module) -> SplitFeatures | None:
        """The prompted tower over a whole split, under the caller's autocast."""
        images = self.eval_images.get(name)
        if images is None:
            return None
        found = encode_images(images, self.eval_transform, lambda px: prompter.image_features(self.encoder, px),
                              self.device, workers=self.workers)
        label_of = dict(zip(images.ids, images.labels))
        labels = torch.tensor([label_of[i] for i in found.ids], device=self.device)
        return SplitFeatures(F.normalize(found.features.to(self.device), dim=-1), labels)
