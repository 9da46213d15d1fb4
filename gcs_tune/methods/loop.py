"""One epoch of optimisation, the same for every method: the :class:`Run` says what is trained
(prompter, step rule, loss terms, image source); the loop never asks which method it is.

The engine trains the run of a method's row with it; CasPL's stage 1 and SubPT's pilot pass are
runs of their own through the same function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from gcs_tune.config import RunConfig
from gcs_tune.methods.averaging import NoAveraging
from gcs_tune.methods.losses import LOSS_TERMS, LossInputs
from gcs_tune.methods.sources import ImageBatch
from gcs_tune.methods.steps import SGDStep
from gcs_tune.model.prompters import ClassBank
from gcs_tune.model.text import PromptedTextEncoder


def learning_rate(cfg: RunConfig, epoch: int) -> float:
    """Dassl's schedule (0-based epoch): ``warmup_lr`` for ``warmup_epochs``, then a cosine over
    ``epochs`` that starts counting after the warm-up (``WARMUP_RECOUNT=True``): epoch e >= W gets
    ½·lr·(1 + cos(π(e − W)/E)), so the first epoch after warm-up runs at the full lr."""
    sched = cfg.schedule
    if epoch < sched.warmup_epochs:
        return sched.warmup_lr
    return 0.5 * cfg.optim.lr * (1 + math.cos(math.pi * (epoch - sched.warmup_epochs) / sched.epochs))


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Dassl's train loader: the last partial batch is dropped when the split holds a full one."""
    chunks = list(order.split(batch_size))
    if len(order) >= batch_size and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


Extras = Callable[[ImageBatch], dict[str, Any]]  # the optional LossInputs fields of a batch


@dataclass
class Run:
    """Everything one training run updates or reads. ``cfg`` is the recipe it follows (a stage may
    run with its own epochs, learning rate and batch size)."""

    cfg: RunConfig
    prompter: nn.Module
    encoder: PromptedTextEncoder
    train_bank: ClassBank  # the classes the loss scores
    eval_bank: ClassBank  # every class of the run, for evaluation
    source: Any  # CachedImages | TowerImages | FrozenTowerImages (gcs_tune.methods.sources)
    step: SGDStep
    optimizer: torch.optim.Optimizer
    weights: dict[str, float]  # LOSS_TERMS key -> weight
    frozen_text: torch.Tensor  # (C_train, D) the reference model's text features of the training classes
    scale: torch.Tensor
    label_offset: int  # dataset label of the first training class
    generator: torch.Generator
    train_precision: Any  # the context the closure runs in (fp32 for the SAM family's gradients)
    precision: Any  # the run's autocast, for evaluation
    extras: Extras = field(default=lambda batch: {})
    averaging: Any = field(default_factory=NoAveraging)

    def state_dict(self) -> dict[str, Any]:
        """Everything of the run that an epoch changes and a later epoch reads, copied to the CPU
        (torch's state dicts hold live references). The rest comes again from the config and the
        seed; the image source keeps nothing across epochs (``begin_epoch`` draws from the
        generator). Plain tensors, numbers and dicts: ``torch.load(weights_only=True)`` reads them."""
        return _cpu_copy({"prompter": self.prompter.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "step": self.step.state_dict(), "averaging": self.averaging.state_dict(),
                          "generator": self.generator.get_state()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the run was just built from its seed)."""
        self.prompter.load_state_dict(state["prompter"])  # in place: the optimiser keeps its parameters
        self.optimizer.load_state_dict(state["optimizer"])  # moves its buffers to the parameters' device
        self.step.load_state_dict(state["step"])
        self.averaging.load_state_dict(state["averaging"])
        self.generator.set_state(state["generator"])


def _cpu_copy(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_copy(v) for v in tree)
    return tree


def train_epoch(run: Run, epoch: int) -> float:
    """One epoch (0-based) of ``run``; the mean training loss (not finite: it diverged, and the
    epoch stopped at the first bad step)."""
    lr = learning_rate(run.cfg, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.source.begin_epoch(epoch, run.generator)
    order = torch.randperm(len(run.source), generator=run.generator)
    total, steps = 0.0, 0
    for chunk in batches(order, run.cfg.optim.batch_size):
        loss = float(run.step.step(_closure(run, run.source.batch(chunk.to(run.frozen_text.device)))))
        total, steps = total + loss, steps + 1
        if not math.isfinite(loss):
            break
    return total / max(steps, 1)


def _closure(run: Run, batch: ImageBatch) -> Callable[[], torch.Tensor]:
    targets = batch.labels - run.label_offset  # (B,) indices into the training classes

    def closure() -> torch.Tensor:
        with run.train_precision:
            image = run.source.features(batch, run.prompter)  # (B, D)
            text = run.prompter.text_features(run.encoder, run.train_bank)  # (C_train, D)
            inputs = LossInputs(image, targets, text, run.frozen_text, run.scale, **run.extras(batch))
            loss = sum(w * LOSS_TERMS[name](inputs) for name, w in run.weights.items())
        loss.backward()
        return loss.detach()

    return closure
