"""Pre-train the lab CLIP (``lab-vit-tiny``) on the lab's pre-training domain, from scratch.

Contrastive image-text training on freshly drawn images of all 64 classes, captions from a
template list, captions of the same class counted as positives (a batch holds ~2 images per class,
so plain CLIP targets would call half the right captions wrong). The default recipe -- a single
template "a photo of a {}." -- follows the lab notes: a text tower that has only ever seen one
phrasing is weak enough that prompt learning on the shifted downstream domain over-fits the base
classes, the phenomenon the prompt methods are about.

At the end it measures what the lab needs (zero-shot on both domains, a nearest-class-mean probe
on frozen downstream features), saves an fp16 state_dict loadable by
``open_clip.create_model("lab-vit-tiny", pretrained=path)``, reloads it, checks the numbers, and
writes the recipe and the numbers to a JSON beside it.

    python pipelines/pretrain_lab.py   # the shipped checkpoint: ~8 min on an idle 2-core CPU
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

import gcs_tune
from gcs_tune.data import lab

PACKAGE_DIR = Path(gcs_tune.__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "model" / "configs"
MODEL_NAME = "lab-vit-tiny"
DEFAULT_OUT = PACKAGE_DIR / "model" / "weights" / f"{MODEL_NAME}.pt"
EVAL_TEMPLATE = "a photo of a {}."
PROBE_SHOTS = 16


def arguments(steps: int, templates: list[str], out: Path) -> argparse.ArgumentParser:
    """The pre-training options (shared with ``pretrain_teacher.py``, which adds its own)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch stream")
    p.add_argument("--data-seed", type=int, default=0, help="lab_dataset seed used for the evaluation")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine to 0")
    p.add_argument("--templates", nargs="+", default=templates,
                   help="caption templates, each with one '{}' for the class name")
    p.add_argument("--eval-per-class", type=int, default=50, help="pre-training-domain test images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=out, help="checkpoint path (.pt); JSON beside it")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return arguments(2000, [EVAL_TEMPLATE], DEFAULT_OUT).parse_args(argv)


# --- text: the captions are short, so run the text tower only up to the longest EOS -----------

def caption_tokens(tokenizer, templates: list[str]) -> torch.Tensor:
    """(n_templates, n_classes, L) token ids, cut at the longest EOS over all captions."""
    texts = [t.format(name) for t in templates for name in lab.LAB_CLASSNAMES]
    tokens = tokenizer(texts)  # (T * C, 77)
    length = int(tokens.argmax(dim=-1).max()) + 1  # EOS has the largest id
    return tokens[:, :length].reshape(len(templates), len(lab.LAB_CLASSNAMES), length).contiguous()


def encode_text_cut(model, tokens: torch.Tensor, embed=None) -> torch.Tensor:
    """``model.encode_text`` on tokens cut to L < 77: exact, because the causal mask means no
    position before the EOS attends to the padding that was cut (mask and positions sliced too).
    ``embed`` replaces the token embedding (training uses the small table of ``UsedVocab``)."""
    length = tokens.shape[1]
    x = (embed or model.token_embedding)(tokens) + model.positional_embedding[:length]  # (n, L, w)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # features at the EOS token
    return x @ model.text_projection  # (n, embed_dim)


class UsedVocab:
    """Trains only the embedding rows the captions use (~20 of 49408).

    The other rows get no gradient anyway, but AdamW would still sweep all 6.3 M of them every
    step (a fifth of the step time). Token ids are remapped to rows of a small table; the remap
    keeps the order, so the EOS is still the largest id and argmax pooling still finds it.
    """

    def __init__(self, model, tokens: torch.Tensor):
        self.model = model
        self.ids = torch.unique(tokens)  # sorted
        self.table = torch.nn.Parameter(model.token_embedding.weight.detach()[self.ids].clone())

    def remap(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.ids, tokens)

    def __call__(self, remapped: torch.Tensor) -> torch.Tensor:
        return self.table[remapped]

    def write_back(self) -> None:
        with torch.no_grad():
            self.model.token_embedding.weight[self.ids] = self.table


# --- images -------------------------------------------------------------------------------------

def to_model_input(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> normalised (B, 3, 32, 32); equals open_clip's eval preprocess at
    32 px (its resize and crop are the identity there)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


@torch.no_grad()
def image_features(model, preprocess, load, n: int, batch: int = 512) -> torch.Tensor:
    """Normalised features of images ``load(0..n-1)`` through the same preprocess users get."""
    feats = []
    for start in range(0, n, batch):
        x = torch.stack([preprocess(load(i)) for i in range(start, min(n, start + batch))])
        feats.append(F.normalize(model.encode_image(x), dim=-1))
    return torch.cat(feats)


# --- training -----------------------------------------------------------------------------------

def multi_positive_loss(img, txt, img_labels, txt_labels, scale) -> torch.Tensor:
    """Symmetric contrastive loss where every caption of an image's class is a positive."""
    logits = scale * img @ txt.T  # (B, U)
    pos = (img_labels[:, None] == txt_labels[None, :]).float()  # (B, U)
    loss_i = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1)
    loss_t = -(F.log_softmax(logits, dim=0) * pos).sum(0) / pos.sum(0)
    return 0.5 * (loss_i.mean() + loss_t.mean())


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_batch(rng: np.random.Generator, step: int, args) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one step: fresh pre-training-domain draws of every class."""
    return lab.lab_batch(rng, args.batch_size, domain="pretrain")


def train(model, tokens: torch.Tensor, args, draw=pretrain_batch, salt: int = 0x5EED,
          desc: str = "pretrain") -> tuple[list[float], list[float]]:
    """Contrastive training on the images ``draw(rng, step, args)`` gives (the teacher passes its
    own stream and rng salt); returns the loss and the wall time (s) of every step."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rng = np.random.default_rng([args.seed, salt])  # a stream of its own: no lab_image key
    vocab = UsedVocab(model, tokens)
    tokens = vocab.remap(tokens)
    params = [p for n, p in model.named_parameters() if n != "token_embedding.weight"]
    opt = torch.optim.AdamW(params + [vocab.table], lr=args.lr, weight_decay=args.weight_decay)
    n_templates, n_classes = tokens.shape[:2]
    losses, step_times = [], []
    model.train()
    bar = tqdm(range(args.steps), desc=desc, mininterval=2.0)
    for step in bar:
        t0 = time.perf_counter()
        images, labels = draw(rng, step, args)
        # Each image gets a random template; encode each distinct (template, class) caption once.
        pair = rng.integers(0, n_templates, len(labels)) * n_classes + labels
        uniq = np.unique(pair)
        txt = encode_text_cut(model, tokens.reshape(-1, tokens.shape[-1])[torch.from_numpy(uniq)],
                              embed=vocab)
        img = model.encode_image(to_model_input(images, mean, std))
        loss = multi_positive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1),
                                   torch.from_numpy(labels), torch.from_numpy(uniq % n_classes),
                                   model.logit_scale.exp())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as in CLIP
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t0)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    vocab.write_back()
    model.eval()
    return losses, step_times


# --- evaluation ---------------------------------------------------------------------------------

def accuracy(feats, labels, class_feats, classes) -> float:
    """Top-1 among ``classes`` only, on the images whose label is one of them (percent)."""
    classes = torch.as_tensor(classes)
    keep = torch.isin(labels, classes)
    pred = classes[(feats[keep] @ class_feats[classes].T).argmax(dim=1)]
    return round(100.0 * (pred == labels[keep]).float().mean().item(), 2)


def scores(feats, labels, class_feats) -> dict:
    n = len(lab.LAB_CLASSNAMES)
    return {"base": accuracy(feats, labels, class_feats, range(lab.NUM_BASE)),
            "novel": accuracy(feats, labels, class_feats, range(lab.NUM_BASE, n)),
            "all": accuracy(feats, labels, class_feats, range(n))}


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, args) -> dict:
    """Zero-shot on the pre-training domain; zero-shot and the frozen-feature probe on every
    downstream variant (v1's keys keep their names from before variants existed)."""
    text = F.normalize(encode_text_cut(model, caption_tokens(tokenizer, [EVAL_TEMPLATE])[0]), dim=-1)
    per, n_cls = args.eval_per_class, len(lab.LAB_CLASSNAMES)
    pre_labels = torch.arange(n_cls).repeat_interleave(per)
    pre_feats = image_features(model, preprocess, lambda i: lab.lab_image(
        "pretrain", i // per, lab.SPLIT_OFFSETS["test"] + i % per, args.data_seed), n_cls * per)
    metrics = {"zero_shot_pretrain": scores(pre_feats, pre_labels, text)}
    for variant in lab.LAB_VARIANTS:
        suffix = "" if variant == "v1" else f"_{variant}"
        zs, probe = downstream_scores(model, preprocess, text, variant, args)
        metrics[f"zero_shot_downstream{suffix}"], metrics[f"probe_downstream{suffix}"] = zs, probe
    return metrics


def downstream_scores(model, preprocess, text, variant: str, args) -> tuple[dict, dict]:
    """(zero-shot, nearest-class-mean probe) on the test split of one downstream variant."""
    n_cls = len(lab.LAB_CLASSNAMES)
    data = lab.lab_dataset(seed=args.data_seed, train_per_class=PROBE_SHOTS, variant=variant)
    test_labels = torch.tensor(data.test.labels)
    test_feats = image_features(model, preprocess, data.test.load, len(data.test))
    train_feats = image_features(model, preprocess, data.train.load, len(data.train))
    means = torch.stack([train_feats[torch.tensor(data.train.labels) == k].mean(0)
                         for k in range(n_cls)])
    return (scores(test_feats, test_labels, text),
            scores(test_feats, test_labels, F.normalize(means, dim=-1)))


# --- checkpoint ---------------------------------------------------------------------------------

def save_checkpoint(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               path)


def reload_and_check(model_name: str, path: Path, expected: dict, args) -> None:
    """Load the file the way users will and demand the same numbers (weights were already
    rounded to fp16 before the first evaluation, so they must match exactly)."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path))
    got = evaluate(model.eval(), preprocess, open_clip.get_tokenizer(model_name), args)
    if got != expected:
        raise RuntimeError(f"reloaded checkpoint disagrees:\n{got}\n!=\n{expected}")


def write_report(args, metrics: dict, losses: list[float], times: dict) -> Path:
    data = args.out.read_bytes()
    report = {
        "model": MODEL_NAME,
        "checkpoint": args.out.name,
        "checkpoint_bytes": len(data),
        "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
        "recipe": {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
                   "optimizer": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay,
                   "schedule": f"linear warm-up {args.warmup} steps, cosine to 0",
                   "templates": args.templates,
                   "loss": "symmetric contrastive, same-class captions are positives",
                   "command": "python pipelines/pretrain_lab.py"},
        "domains": {"pretrain": "32 px RGB coloured shapes, random position/size/rotation, dark "
                                "background, colour jitter; all 64 classes",
                    "downstream": {name: v.summary for name, v in lab.VARIANTS.items()}},
        "evaluation": {"data_seed": args.data_seed, "zero_shot_template": EVAL_TEMPLATE,
                       "pretrain_images_per_class": args.eval_per_class,
                       "probe": f"nearest class mean, {PROBE_SHOTS} shots per class, all 64 classes"
                                " (base/novel: among their own 32)",
                       "accuracies_percent": metrics},
        "final_loss_mean_last_50": round(float(np.mean(losses[-50:])), 4),
        "wall_time_s": times,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main(argv=None) -> dict:
    return pretrain(MODEL_NAME, parse_args(argv), train, write_report)


def pretrain(model_name: str, args, train_fn, report_fn) -> dict:
    """Train ``model_name`` from scratch with ``train_fn``, evaluate the fp16-rounded weights, save
    them, reload the file as users will and demand the same numbers, write the JSON report
    (``report_fn``). Shared with ``pretrain_teacher.py``."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # else multithreaded CPU kernels differ run to run
    open_clip.add_model_config(CONFIG_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    losses, step_times = train_fn(model, caption_tokens(tokenizer, args.templates), args)
    t_train = time.perf_counter() - t0
    model.half().float()  # evaluate exactly the weights that get shipped
    metrics = evaluate(model, preprocess, tokenizer, args)
    save_checkpoint(model, args.out)
    reload_and_check(model_name, args.out, metrics, args)
    # The median step time tells what the run costs on an idle machine when others shared it.
    times = {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1),
             "median_step": round(float(np.median(step_times)), 4)}
    report = report_fn(args, metrics, losses, times)
    for key, value in metrics.items():
        print(f"{key:>25}: " + "  ".join(f"{k} {v:5.1f}" for k, v in value.items()))
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB) and {report.name}; "
          f"train {times['train']:.0f} s, total {times['total']:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
