"""The shapes every dataset reader returns: an indexable list of images, and its three splits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image


@dataclass(frozen=True)
class ImageSet:
    """Images of one split, loaded lazily.

    ``ids`` are stable, unique strings (a relative path, or ``lab/<domain>/<split>/<i>``): the
    feature cache keys on them, so the same id must always mean the same pixels.
    """

    ids: tuple[str, ...]
    labels: tuple[int, ...]
    load: Callable[[int], Image.Image]  # index -> RGB image

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        indices = list(indices)
        load = self.load
        return ImageSet(
            ids=tuple(self.ids[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            load=lambda j: load(indices[j]),
        )


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset in the base-to-novel protocol's terms: class names ordered by label, three splits."""

    name: str
    classnames: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet
