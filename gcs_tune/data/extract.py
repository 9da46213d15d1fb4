"""Run a frozen image encoder over an :class:`ImageSet`, skipping (and counting) bad images."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from gcs_tune.data.cache import CachedFeatures
from gcs_tune.data.fewshot import DataError
from gcs_tune.data.types import ImageSet

log = logging.getLogger(__name__)
Transform = Callable[[object], torch.Tensor]  # PIL image -> (3, H, W)


class _Decoded(Dataset):
    def __init__(self, images: ImageSet, transform: Transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(self.images.load(i))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            log.warning("skipping image %s: %s", self.images.ids[i], exc)
            return None


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0, dtype=torch.long), None
    return torch.tensor([i for i, _ in batch]), torch.stack([x for _, x in batch])


@torch.no_grad()
def encode_images(images: ImageSet, transform: Transform, encode: Callable[[torch.Tensor], torch.Tensor],
                  *, batch_size: int = 256, workers: int = 0, seed: int = 0,
                  progress: Callable | None = None) -> CachedFeatures:
    """Features (N_ok, D) of every image that decodes, in order; ``seed`` fixes random transforms.

    ``progress(iterable, total)`` wraps the batch loop (a progress bar), or None."""
    torch.manual_seed(seed)  # random train views drawn in the main process (workers=0)
    loader = DataLoader(_Decoded(images, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, generator=torch.Generator().manual_seed(seed))
    batches = progress(loader, len(loader)) if progress else loader
    kept, feats = [], []
    for idx, pixels in batches:
        if pixels is None:
            continue
        kept.append(idx)
        feats.append(encode(pixels).float().cpu())
    if not feats:
        raise DataError(f"none of the {len(images)} images decoded (the first is {images.ids[0]}); "
                        "see the warnings above")
    kept_idx = torch.cat(kept).tolist()
    if len(kept_idx) < len(images):
        log.warning("%d of %d images could not be read and were skipped", len(images) - len(kept_idx), len(images))
    return CachedFeatures(tuple(images.ids[i] for i in kept_idx), torch.cat(feats))
