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

Three implementations, the row's ``images``: ``cache`` (:class:`CachedImages`), ``tower``
(:class:`TowerImages`) and ``frozen_tower`` (:class:`FrozenTowerImages`: vision prompts that
training never changes, so each crop goes through the prompted tower once).

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
    prompted: torch.Tensor | None = None  # (B, D) the prompted tower's features, when frozen prompts let them be kept


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
        return self.pixels_of(rows, self.draws)

    def pixels_of(self, rows: list[int], draws: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) crops of cache rows ``rows``, row r in draw ``draws[r]``."""
        crops = [self.augment(self.images.load(self.rows[r]), draw_rng(self.seed, self.ids[r], int(draws[r])))
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


class FrozenTowerImages:
    """Vision prompts that training never changes (CasPL's frozen boosting prompt under CoOp, a
    text-only host): the tower path's features at the cache path's cost. Each crop goes through
    the prompted tower once, without grad, under the run's training precision, and the run then
    reads those features as rows; val and test are encoded once. Held views (``data.views: K``)
    are all encoded when the first epoch begins; the per-epoch stream, one draw per epoch."""

    CHUNK = 256  # crops per forward

    def __init__(self, tower: TowerImages, prompter: nn.Module, precision):
        self.tower, self.prompter, self.precision = tower, prompter, precision
        with torch.enable_grad(), precision:  # a trainable vision prompt would make this row wrong
            probe = prompter.image_features(tower.encoder, tower.pixels_of([0], torch.zeros(1, dtype=torch.long)))
        if probe.requires_grad:
            raise ValueError("images: frozen_tower needs vision prompts that do not train; "
                             "this prompter's image features carry a gradient (use images: tower)")
        self.held: torch.Tensor | None = None  # (K, N, D) every held view
        self.feats: torch.Tensor | None = None  # (N, D) this epoch's
        self.splits: dict[str, SplitFeatures | None] = {}

    def __len__(self) -> int:
        return len(self.tower)

    @torch.no_grad()
    def _encode(self, draws: torch.Tensor) -> torch.Tensor:
        """(N, D) the prompted tower on image i's crop ``draws[i]``, every training image."""
        rows = list(range(len(self.tower)))
        with self.precision:
            parts = [self.prompter.image_features(self.tower.encoder, self.tower.pixels_of(rows[i:i + self.CHUNK], draws))
                     for i in range(0, len(rows), self.CHUNK)]
        return torch.cat(parts)

    def begin_epoch(self, epoch: int, generator: torch.Generator) -> None:
        self.tower.begin_epoch(epoch, generator)  # the same draws, from the same RNG use
        draws, held = self.tower.draws, self.tower.reference.held
        if held is None:
            self.feats = self._encode(draws)
            return
        if self.held is None:
            n = len(self.tower)
            self.held = torch.stack([self._encode(torch.full((n,), k, dtype=torch.long)) for k in range(held.shape[0])])
        self.feats = self.held[draws.to(self.held.device), torch.arange(draws.shape[0], device=self.held.device)]

    def batch(self, idx: torch.Tensor) -> ImageBatch:
        return ImageBatch(self.tower.reference.labels[idx], self.tower.frozen[idx], prompted=self.feats[idx])

    def features(self, batch: ImageBatch, prompter: nn.Module) -> torch.Tensor:
        return batch.prompted

    def split(self, name: str, prompter: nn.Module) -> SplitFeatures | None:
        if name not in self.splits:
            self.splits[name] = self.tower.split(name, prompter)
        return self.splits[name]
