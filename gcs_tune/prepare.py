"""Everything a run needs before its first step, computed once and cached: the frozen backbone,
the few-shot splits, the image features of every split (the training images as a seeded stream of
augmented draws), and the zero-shot reference. Trials of a search share it through the on-disk
caches: a trial that finds the features there encodes nothing."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from gcs_tune.config import RunConfig
from gcs_tune.data.augment import DrawStore, SeededAugment, encode_draws
from gcs_tune.data.cache import CachedFeatures, FeatureCache, ids_digest
from gcs_tune.data.extract import default_workers, encode_images
from gcs_tune.data.fewshot import base_novel_split, pseudo_novel_order, sample_few_shot
from gcs_tune.data.readers import read_coop, read_imagefolder
from gcs_tune.data.templates import zero_shot_template
from gcs_tune.data.types import DatasetSplits, ImageSet
from gcs_tune.model.backbone import Backbone, load_backbone
from gcs_tune.model.precision import autocast, uses_bf16

log = logging.getLogger(__name__)
Progress = Callable[[object, int, str], object] | None  # (iterable, total, description) -> iterable


@dataclass(frozen=True)
class SplitFeatures:
    features: torch.Tensor  # (N, D) L2-normalised, fp32, on the run's device
    labels: torch.Tensor  # (N,)


@dataclass(frozen=True)
class TrainFeatures:
    """The training images' features, epoch by epoch: draw e at epoch e (``views: epoch``, read
    memory-mapped when the epoch starts), or one of K draws held in memory per image."""

    labels: torch.Tensor  # (N,) in the order of the draws' ids
    store: DrawStore
    held: torch.Tensor | None  # (K, N, D) normalised, for views=K; None for the per-epoch stream
    device: torch.device

    def epoch(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """(N, D) normalised features of every training image for ``epoch`` (0-based)."""
        return self.features(self.draws(epoch, generator))

    def draws(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """(N,) the draw each image shows at ``epoch``: draw ``epoch`` (``views: epoch``), or one
        of the K held draws picked per image. The pixels of the per-image path are these draws."""
        n = self.labels.shape[0]
        if self.held is not None:
            return torch.randint(self.held.shape[0], (n,), generator=generator)  # a view per image
        return torch.full((n,), epoch, dtype=torch.long)

    def features(self, draws: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised features of image i in draw ``draws[i]``."""
        if self.held is not None:
            return self.held[draws.to(self.device), torch.arange(draws.shape[0], device=self.device)]
        return F.normalize(self.store.read(int(draws[0]))[1].to(self.device), dim=-1)  # one draw per epoch


@dataclass(frozen=True)
class Encoding:
    """What preparing cost: draws encoded now (0 when the stream was cached) and seconds."""

    draws: int
    images: int
    seconds: float
    pid: int = field(default_factory=os.getpid)  # the process that encoded (the driver, or a Ray task)


@dataclass(frozen=True)
class Prepared:
    backbone: Backbone
    classnames: tuple[str, ...]
    base: range  # labels trained on
    novel: range  # labels held out (pseudo-novel ones in a pseudo_novel split)
    train: TrainFeatures  # base classes only
    val: SplitFeatures  # few-shot validation images: selection happens here
    test: SplitFeatures | None  # the test split (None when eval.test is off): never selected on
    zero_shot_text: torch.Tensor  # (C, D) L2-normalised features of the hand-crafted prompt
    template: str  # the hand-crafted prompt
    encoding: Encoding
    seconds: float
    # The images behind the features, for a method that runs the image tower itself (the
    # per-image path of the image-feature seam, gcs_tune.methods.sources).
    images: dict[str, ImageSet] = field(default_factory=dict)  # "train" (few-shot), "val", "test"
    seed: int = 0  # the seed of the training draws (draw_rng(seed, image id, draw))


def load_dataset(cfg: RunConfig) -> DatasetSplits:
    data = cfg.data
    if data.dataset == "lab":
        from gcs_tune.data.lab import lab_dataset
        return lab_dataset(seed=0, test_per_class=data.lab_test_per_class, variant=data.lab_variant)
    if data.dataset == "imagefolder":
        return read_imagefolder(data.root, seed=data.split_seed)
    return read_coop(data.root, data.dataset)


def protocol_splits(cfg: RunConfig, splits: DatasetSplits) -> tuple[tuple[str, ...], range, range, ImageSet, ImageSet,
                                                                   ImageSet | None]:
    """(class names, trained labels, held-out labels, few-shot train, few-shot val, test or None).

    ``base_novel``: base = the first ceil(n/2) labels. ``pseudo_novel``: the base classes only,
    relabelled so the pseudo-base half comes first; no image of a novel class is ever loaded."""
    n, where, data = len(splits.classnames), cfg.data.dataset, cfg.data
    if data.split == "pseudo_novel":
        order = pseudo_novel_order(n, data.pseudo_seed)  # original labels, pseudo-base first
        trained, kept = order[: (len(order) + 1) // 2], order
    else:
        trained, kept = list(base_novel_split(n)[0]), list(range(n))
    train = sample_few_shot(splits.train, data.shots, cfg.seed, f"{where} train", labels=trained)
    # ImageNet has no val split: val is drawn from the train images, minus the ones trained on
    val = sample_few_shot(splits.val, data.val_shots_resolved, cfg.seed, f"{where} val", labels=kept,
                          exclude=frozenset(train.ids))
    test = splits.test if cfg.eval.test else None
    if data.split == "pseudo_novel":
        relabel = {old: new for new, old in enumerate(kept)}
        train, val = train.relabel(relabel), val.relabel(relabel)
        test = test.relabel(relabel) if test is not None else None
    names = tuple(splits.classnames[y] for y in kept)
    return names, range(len(trained)), range(len(trained), len(kept)), train, val, test


def feature_key(backbone: Backbone, cfg: RunConfig, split: str, ids: tuple[str, ...]) -> dict[str, Any]:
    """Everything that decides the features of a list of images (the lab's ids name its variant)."""
    return {"model": backbone.name, "weights": backbone.weights, "quick_gelu": backbone.quick_gelu,
            "bf16": uses_bf16(backbone.device, cfg.backbone.precision), "dataset": cfg.data.dataset,
            "root": str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else None,
            "split": split, "ids": ids_digest(ids), "n": len(ids)}


def _workers(cfg: RunConfig) -> int:
    return 0 if cfg.data.dataset == "lab" else default_workers()  # lab images render in microseconds


def _eval_features(cache: FeatureCache, backbone: Backbone, cfg: RunConfig, split: str, images: ImageSet,
                   progress: Progress) -> SplitFeatures:
    bar = (lambda it, total: progress(it, total, f"encoding {split}")) if progress else None

    def compute() -> CachedFeatures:
        with autocast(backbone.device, cfg.backbone.precision):
            return encode_images(images, backbone.eval_transform, backbone.encode_images, backbone.device,
                                 workers=_workers(cfg), progress=bar)

    found, hit = cache.get_or_compute(feature_key(backbone, cfg, split, images.ids), compute)
    log.info("%s features: %s", split, "cache hit" if hit else "computed")
    label_of = dict(zip(images.ids, images.labels))
    labels = torch.tensor([label_of[i] for i in found.ids], device=backbone.device)
    return SplitFeatures(F.normalize(found.features.to(backbone.device), dim=-1), labels)


def _train_features(backbone: Backbone, cfg: RunConfig, images: ImageSet,
                    progress: Progress) -> tuple[TrainFeatures, Encoding]:
    """Encode the missing draws (all epochs, or the K views), then hand out the epoch reader."""
    lo, hi = cfg.data.crop_scale_resolved
    key = {**feature_key(backbone, cfg, "train", images.ids), "crop_scale": [lo, hi], "seed": cfg.seed,
           "augment": "random-resized-crop+flip"}
    store = DrawStore.open(cfg.data.cache_dir, key)
    per_epoch = cfg.data.views == "epoch"
    draws = range(cfg.schedule.epochs if per_epoch else cfg.data.views)
    augment = SeededAugment(backbone.image_size, (lo, hi), backbone.mean, backbone.std)
    bar = (lambda it, total: progress(it, total, "encoding train draws")) if progress else None
    start = time.perf_counter()
    with autocast(backbone.device, cfg.backbone.precision):
        encoded = encode_draws(store, images, augment, cfg.seed, draws, backbone.encode_images, backbone.device,
                               workers=_workers(cfg), progress=bar)
    encoding = Encoding(encoded, len(images), time.perf_counter() - start)
    log.info("train draws: %d of %d encoded (%.1f s), the rest cached", encoded, len(draws), encoding.seconds)
    ids = store.ids()
    label_of = dict(zip(images.ids, images.labels))
    labels = torch.tensor([label_of[i] for i in ids], device=backbone.device)
    held = None
    if not per_epoch:
        held = torch.stack([F.normalize(store.read(d)[1], dim=-1) for d in draws]).to(backbone.device)  # (K, N, D)
    return TrainFeatures(labels, store, held, backbone.device), encoding


def unlabeled_train(cfg: RunConfig, shots: int | None = None) -> ImageSet:
    """Every train image of the classes a run may read (or ``shots`` per class, seeded), with the
    run's labels, which no loss reads: CasPL's unlabeled domain images. All classes in a base_novel
    split -- novel ones included, which is why CasPL is its own row -- and the base classes only in
    a pseudo_novel split."""
    splits = load_dataset(cfg)
    n = len(splits.classnames)
    kept = pseudo_novel_order(n, cfg.data.pseudo_seed) if cfg.data.split == "pseudo_novel" else list(range(n))
    images = splits.train
    if shots is not None:
        images = sample_few_shot(images, shots, cfg.seed, f"{cfg.data.dataset} unlabeled train", labels=kept)
    return images.relabel({old: new for new, old in enumerate(kept)})


def train_features(backbone: Backbone, cfg: RunConfig, images: ImageSet) -> TrainFeatures:
    """The seeded augmentation stream of ``images`` encoded by ``backbone`` (cached on disk)."""
    return _train_features(backbone, cfg, images, None)[0]


@torch.no_grad()
def zero_shot_text(backbone: Backbone, classnames, template: str) -> torch.Tensor:
    """(C, D) normalised text features of the hand-crafted prompt, from open_clip's own encode_text
    (fp32: it is computed once and is the reference every method is compared with)."""
    tokens = backbone.tokenizer([template.format(c) for c in classnames]).to(backbone.device)
    return F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


def prepare(cfg: RunConfig, progress: Progress = None) -> Prepared:
    """Load, sample and encode; every image feature comes from the cache when it is there."""
    start = time.perf_counter()
    classnames, trained, held_out, train, val, test = protocol_splits(cfg, load_dataset(cfg))
    backbone = load_backbone(cfg.backbone)
    cache = FeatureCache(cfg.data.cache_dir)
    train_feats, encoding = _train_features(backbone, cfg, train, progress)
    template = zero_shot_template(cfg.data.dataset, cfg.prompt.zero_shot_template)
    return Prepared(backbone=backbone, classnames=classnames, base=trained, novel=held_out, train=train_feats,
                    val=_eval_features(cache, backbone, cfg, "val", val, progress),
                    test=_eval_features(cache, backbone, cfg, "test", test, progress) if test is not None else None,
                    zero_shot_text=zero_shot_text(backbone, classnames, template), template=template,
                    encoding=encoding, seconds=time.perf_counter() - start,
                    images={"train": train, "val": val, **({"test": test} if test is not None else {})},
                    seed=cfg.seed)
