"""Pre-train the lab's teacher CLIP (``lab-vit-teacher``) for CasPL, from scratch.

CasPL distils a larger CLIP (ViT-L/14 for a ViT-B/16 student) into a boosting prompt. A teacher only
teaches if it knows the downstream domain better than the student: ViT-L/14 was trained longer on
more of the web. The lab's teacher is likewise larger (6 layers instead of 4 in both towers, a
wider embedding), trained longer, on more varied captions (six phrasings instead of one), and on a
wider web: besides the pre-training domain it sees fresh images of the downstream domain (of the
variant named, default the lab's default) under their class names -- never an image of the
downstream train / val / test splits (its own rng seed, its own index range). That is exactly what
makes CasPL not a like-for-like competitor: its teacher has seen more of the domain.

Everything generic is reused from ``pretrain_lab.py`` (caption tokens, the text tower cut at EOS,
the used-vocabulary trick, the multi-positive loss, the schedule, the evaluation, the fp16
checkpoint); only the image stream and the model name differ. Deterministic kernels: the same
command rebuilds the same checkpoint bit for bit on the same torch build.

    python pipelines/pretrain_teacher.py                 # the shipped teacher
    python pipelines/pretrain_teacher.py --steps 5 --out /tmp/t.pt --eval-per-class 2   # a smoke run
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import open_clip
import torch

import pretrain_lab as base  # this folder: the student's pipeline, reused by import
from gcs_tune.data import lab

MODEL_NAME = "lab-vit-teacher"
DEFAULT_OUT = base.PACKAGE_DIR / "model" / "weights" / f"{MODEL_NAME}.pt"
TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.",
             "a {} shape."]
DATA_SEED = 1  # the teacher's images: a seed no split uses (the splits use 0), so never a split image
INDEX_BASE = 10_000_000  # ... and an index range of their own


def parse_args(argv=None) -> argparse.Namespace:
    p = base.arguments(2500, TEMPLATES, DEFAULT_OUT)
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--variant", default=lab.DEFAULT_VARIANT, help="downstream variant the teacher's web holds")
    p.add_argument("--downstream-share", type=float, default=0.5, help="share of downstream images per batch")
    return p.parse_args(argv)


def batch(rng: np.random.Generator, step: int, args) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, 32, 32, 3) images and labels: the first round(B·share) from the downstream domain
    (fresh draws keyed by their own seed and index range), the rest a ``lab_batch`` of the
    pre-training domain. (``lab_batch`` renders only the pre-training domain's hues.)"""
    n_down = round(args.batch_size * args.downstream_share)
    pre, pre_labels = lab.lab_batch(rng, args.batch_size - n_down, domain="pretrain")
    labels = rng.integers(0, len(lab.LAB_CLASSNAMES), n_down)
    down = [np.asarray(lab.lab_image("downstream", int(y), INDEX_BASE + step * args.batch_size + i, DATA_SEED,
                                     args.variant)) for i, y in enumerate(labels)]
    images = np.concatenate([np.stack(down), pre]) if n_down else pre
    return images, np.concatenate([labels.astype(np.int64), pre_labels])


def train(model, tokens: torch.Tensor, args) -> tuple[list[float], list[float]]:
    """pretrain_lab's contrastive training on the teacher's image stream; (loss, seconds) per step."""
    return base.train(model, tokens, args, draw=batch, salt=0x7EAC, desc="pretrain teacher")


def write_report(args, metrics: dict, losses: list[float], times: dict) -> Path:
    import hashlib

    data = args.out.read_bytes()
    report = {
        "model": MODEL_NAME, "checkpoint": args.out.name, "checkpoint_bytes": len(data),
        "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
        "parameters": sum(v.numel() for v in torch.load(args.out, weights_only=True).values()),
        "recipe": {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "optimizer": "AdamW",
                   "lr": args.lr, "weight_decay": args.weight_decay,
                   "schedule": f"linear warm-up {args.warmup} steps, cosine to 0", "templates": args.templates,
                   "images": f"pre-training domain, and with probability {args.downstream_share} the downstream "
                             f"domain ({args.variant}); fresh draws of seed {DATA_SEED} from index {INDEX_BASE}",
                   "loss": "symmetric contrastive, same-class captions are positives",
                   "command": "python pipelines/pretrain_teacher.py"},
        "variant": args.variant,
        "evaluation": {"data_seed": args.data_seed, "zero_shot_template": base.EVAL_TEMPLATE,
                       "accuracies_percent": metrics},
        "final_loss_mean_last_50": round(float(np.mean(losses[-50:])), 4),
        "wall_time_s": times, "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main(argv=None) -> dict:
    return base.pretrain(MODEL_NAME, parse_args(argv), train, write_report)


if __name__ == "__main__":
    main()
