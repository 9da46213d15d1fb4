"""Everything a run needs before its first step, computed once and cached: the frozen backbone,
the few-shot splits, the image features of every split (and of K augmented train views), and
the zero-shot reference. Trials of a search share it through the on-disk feature cache."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from gcs_tune.config import RunConfig
from gcs_tune.data.cache import CachedFeatures, FeatureCache, ids_digest
from gcs_tune.data.extract import encode_images
from gcs_tune.data.fewshot import DataError, base_novel_split, sample_few_shot
from gcs_tune.data.readers import read_coop, read_imagefolder
from gcs_tune.data.types import DatasetSplits, ImageSet
from gcs_tune.model.backbone import Backbone, load_backbone

log = logging.getLogger(__name__)
Progress = Callable[[object, int, str], object] | None  # (iterable, total, description) -> iterable


@dataclass(frozen=True)
class SplitFeatures:
    features: torch.Tensor  # (N, D) L2-normalised, on the run's device
    labels: torch.Tensor  # (N,)


@dataclass(frozen=True)
class Prepared:
    backbone: Backbone
    classnames: tuple[str, ...]
    base: range  # labels trained on
    novel: range
    train_views: torch.Tensor  # (V, N, D) L2-normalised features of V augmented views, base classes only
    train_labels: torch.Tensor  # (N,)
    val: SplitFeatures  # few-shot validation images of all classes: selection happens here
    test: SplitFeatures  # the full test split: measured once at the end, never selected on
    zero_shot_text: torch.Tensor  # (C, D) L2-normalised features of the hand-crafted prompt
    seconds: float


def load_dataset(cfg: RunConfig) -> DatasetSplits:
    data = cfg.data
    if data.dataset == "lab":
        from gcs_tune.data.lab import lab_dataset
        return lab_dataset(seed=0, test_per_class=data.lab_test_per_class)
    if data.dataset == "imagefolder":
        return read_imagefolder(data.root, seed=data.split_seed)
    return read_coop(data.root, data.dataset)


def _workers(cfg: RunConfig) -> int:
    return 0 if cfg.data.dataset == "lab" else min(8, os.cpu_count() or 1)


def _features(cache: FeatureCache, backbone: Backbone, cfg: RunConfig, split: str, images: ImageSet,
              transform, view: str, seed: int, progress: Progress) -> CachedFeatures:
    key = {"model": backbone.name, "weights": backbone.weights, "dataset": cfg.data.dataset,
           "root": str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else None,
           "split": split, "view": view, "view_seed": seed, "ids": ids_digest(images.ids), "n": len(images),
           "bf16": _bf16(backbone.device, cfg.backbone.precision)}
    bar = (lambda it, total: progress(it, total, f"encoding {split} {view}")) if progress else None

    def compute() -> CachedFeatures:
        with _autocast(backbone.device, cfg.backbone.precision):
            return encode_images(images, transform, backbone.encode_images, seed=seed,
                                 workers=_workers(cfg), progress=bar)

    result, hit = cache.get_or_compute(key, compute)
    log.info("%s %s features: %s", split, view, "cache hit" if hit else "computed")
    return result


def _split_features(found: CachedFeatures, images: ImageSet, device) -> SplitFeatures:
    label_of = dict(zip(images.ids, images.labels))
    labels = torch.tensor([label_of[i] for i in found.ids], device=device)
    return SplitFeatures(F.normalize(found.features.to(device), dim=-1), labels)


def _bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16(device, precision))


@torch.no_grad()
def zero_shot_text(backbone: Backbone, classnames, template: str) -> torch.Tensor:
    """(C, D) normalised text features of the hand-crafted prompt, from open_clip's own encode_text."""
    tokens = backbone.tokenizer([template.format(c) for c in classnames]).to(backbone.device)
    return F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


def prepare(cfg: RunConfig, progress: Progress = None) -> Prepared:
    """Load, sample and encode; every image feature comes from the cache when it is there."""
    start = time.perf_counter()
    splits = load_dataset(cfg)
    base, novel = base_novel_split(len(splits.classnames))
    train = sample_few_shot(splits.train, cfg.data.shots, cfg.seed, f"{cfg.data.dataset} train", labels=base)
    # ImageNet has no val split: val is drawn from the train images, minus the ones trained on
    val = sample_few_shot(splits.val, cfg.data.val_shots_resolved, cfg.seed, f"{cfg.data.dataset} val",
                          exclude=frozenset(train.ids))
    backbone = load_backbone(cfg.backbone)
    cache = FeatureCache(cfg.data.cache_dir)
    device = backbone.device
    lo, hi = cfg.data.crop_scale_resolved
    transform = backbone.train_transform((lo, hi))  # random: each view draws with its own seed
    views = [_features(cache, backbone, cfg, "train", train, transform, f"aug{v}-scale{lo}-{hi}",
                       1000 * cfg.seed + v, progress) for v in range(cfg.data.views)]
    if any(v.ids != views[0].ids for v in views):
        raise DataError(f"{cfg.data.dataset} train: augmented views disagree on which images decoded")
    train_feats = _split_features(views[0], train, device)
    stacked = torch.stack([F.normalize(v.features.to(device), dim=-1) for v in views])  # (V, N, D)
    eval_sets = {}
    for name, images in (("val", val), ("test", splits.test)):
        found = _features(cache, backbone, cfg, name, images, backbone.eval_transform, "eval", 0, progress)
        eval_sets[name] = _split_features(found, images, device)
    return Prepared(backbone=backbone, classnames=splits.classnames, base=base, novel=novel,
                    train_views=stacked, train_labels=train_feats.labels, val=eval_sets["val"],
                    test=eval_sets["test"],
                    zero_shot_text=zero_shot_text(backbone, splits.classnames, cfg.prompt.zero_shot_template),
                    seconds=time.perf_counter() - start)
