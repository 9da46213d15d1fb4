"""The training loop: ``fit(cfg)`` yields one :class:`EpochResult` per epoch.

Knows nothing of Ray or MLflow. Selection-relevant numbers (base/novel/HM/objective) are measured
on the validation split; the test split is measured once, after the last epoch, and reported in
``EpochResult.final`` only. Every result before the last carries the run's :class:`RunState`:
``fit(cfg, prep, resume=state)`` continues at the next epoch as if never stopped.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from gcs_tune.config import RunConfig
from gcs_tune.methods.assemble import build_run, loss_weights  # noqa: F401  (loss_weights: re-exported)
from gcs_tune.methods.loop import Run, batches, learning_rate, train_epoch  # noqa: F401  (batches: re-exported)
from gcs_tune.methods.table import METHODS
from gcs_tune.model.precision import fp32
from gcs_tune.objective import harmonic_mean, resolve_floor, score, worst
from gcs_tune.prepare import Prepared, SplitFeatures, prepare


@dataclass(frozen=True)
class Accuracy:
    base: float  # % among base classes only
    novel: float  # % among novel classes only
    n_base: int = 0  # images scored in each half: the binomial standard error comes from them
    n_novel: int = 0

    @property
    def hm(self) -> float:
        return harmonic_mean(self.base, self.novel)

    @property
    def base_se(self) -> float:
        return standard_error(self.base, self.n_base)

    @property
    def novel_se(self) -> float:
        return standard_error(self.novel, self.n_novel)


def standard_error(percent: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent: sqrt(p(1-p)/n). A selection lead smaller
    than this is what one or two images more or less would give."""
    if n <= 0 or not math.isfinite(percent):
        return float("nan")
    p = percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


@dataclass(frozen=True)
class FinalResult:
    test: Accuracy | None  # None when the run measures no test split (eval.test off, pseudo_novel)
    zero_shot_test: Accuracy | None
    zero_shot_val: Accuracy
    prompt: dict  # the learned prompt and what is needed to use it without gcs_tune (prompt.pt)


@dataclass(frozen=True)
class RunState:
    """A run after ``epoch`` epochs: what ``fit(..., resume=state)`` continues from."""

    epoch: int  # epochs done: the next one to train is epoch + 1 (1-based)
    val: Accuracy  # the last validation: epochs between evaluations (eval.every > 1) report it again
    run: dict[str, Any]  # Run.state_dict(): prompter, optimiser, step rule, averaging, generator

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and dicts, for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {"epoch": self.epoch, "val": asdict(self.val), "run": self.run}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        return cls(int(d["epoch"]), Accuracy(**d["val"]), d["run"])


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    epochs: int
    train_loss: float
    lr: float
    val: Accuracy
    objective: float
    feasible: bool
    violation: float
    floor: float | None
    seconds: float  # wall time of this epoch's training and validation
    diagnostics: dict[str, float] = field(default_factory=dict)  # e.g. GCSAM case fractions
    diverged: bool = False
    final: FinalResult | None = None  # set on the last result only
    state: RunState | None = field(default=None, repr=False, compare=False)  # set on the others, unless diverged

    def metrics(self) -> dict[str, float]:
        """Flat, finite numbers for reporting (Ray, MLflow, tables)."""
        out = {"epoch": self.epoch, "train_loss": self.train_loss if math.isfinite(self.train_loss) else 1e9,
               "lr": self.lr, "base_acc": self.val.base, "novel_acc": self.val.novel, "hm": self.val.hm,
               "base_acc_se": self.val.base_se, "novel_acc_se": self.val.novel_se,
               "objective": self.objective, "feasible": float(self.feasible), "violation": self.violation,
               "diverged": float(self.diverged), "epoch_seconds": self.seconds, **self.diagnostics}
        if self.floor is not None:
            out["floor"] = self.floor
        if self.final and self.final.test:
            out.update(test_base_acc=self.final.test.base, test_novel_acc=self.final.test.novel,
                       test_hm=self.final.test.hm)
        return {k: v for k, v in out.items() if math.isfinite(v)}  # e.g. mean_cos of a NaN step


def accuracy(split: SplitFeatures, text: torch.Tensor, classes: range) -> tuple[float, int]:
    """(% of ``split``'s images of ``classes`` whose best-scoring class among ``classes`` is right,
    how many images that is)."""
    mask = (split.labels >= classes.start) & (split.labels < classes.stop)
    n = int(mask.sum())
    if n == 0:
        return 0.0, 0
    scores = split.features[mask] @ text[classes.start:classes.stop].t()  # (n, |classes|)
    pred = scores.argmax(dim=-1) + classes.start
    return float((pred == split.labels[mask]).float().mean() * 100), n


@torch.no_grad()
def evaluate(split: SplitFeatures, text: torch.Tensor, prep: Prepared) -> Accuracy:
    """Base and novel accuracy of ``text`` (C, D) features on ``split``. Always scored in fp32,
    outside any autocast: a bf16 product moves cosines by ~0.002 and flips near-ties."""
    with fp32(split.features.device):
        text = F.normalize(text.float(), dim=-1)
        (base, n_base), (novel, n_novel) = accuracy(split, text, prep.base), accuracy(split, text, prep.novel)
    return Accuracy(base, novel, n_base, n_novel)


def fit(cfg: RunConfig, prepared: Prepared | None = None, progress=None,
        resume: RunState | None = None) -> Iterator[EpochResult]:
    """Train the prompt of ``cfg``'s method; one result per epoch, the last one with ``final``.
    ``resume``: a state an earlier ``fit`` of the same config gave; the results of the epochs
    after it are those the uninterrupted run gives.

    The method's row decides everything trained (gcs_tune.methods.assemble); a stage before the
    run (CasPL's boosting prompt) and a rule's pilot pass (SubPT's phase A) count in epoch 1's
    seconds. A resumed run runs neither again: both are in its state."""
    epochs = cfg.schedule.epochs
    if resume is not None and not 1 <= resume.epoch < epochs:
        raise ValueError(f"resume: a state after epoch {resume.epoch} of a {epochs}-epoch run; one after epoch 1 "
                         f"to {epochs - 1} has something left to train")
    prep = prepared or prepare(cfg, progress)
    start = time.perf_counter()
    if resume is None:
        run, ok = _pilot(cfg, prep, build_run(cfg, prep))
    else:
        run, ok = build_run(cfg, prep, resume.run), True
    before = time.perf_counter() - start
    zs_val = evaluate(prep.val, prep.zero_shot_text, prep)
    floor = resolve_floor(cfg.objective, zs_val.base)
    first, val = (resume.epoch, resume.val) if resume else (0, zs_val)

    for epoch in range(first, epochs):
        start = time.perf_counter() - (before if epoch == first else 0.0)
        train_loss = train_epoch(run, epoch) if ok else float("nan")
        if not math.isfinite(train_loss):
            bad = worst(cfg.objective.penalty)
            yield EpochResult(epoch + 1, epochs, train_loss, learning_rate(cfg, epoch), Accuracy(0.0, 0.0),
                              bad.value, False, bad.violation, floor, time.perf_counter() - start,
                              run.step.pop_stats(), diverged=True)
            return
        run.step.end_epoch(epoch)
        run.averaging.update(epoch, run.prompter)
        last = epoch + 1 == epochs
        if last or (epoch + 1) % cfg.eval.every == 0:
            val = _evaluate(run, "val", prep)
        s = score(val.base, val.novel, floor, cfg.objective.penalty)
        stats = run.step.pop_stats()  # before the state: the rule's per-epoch counters start again at 0
        final = _final(cfg, prep, run, zs_val) if last else None
        state = None if last else RunState(epoch + 1, val, run.state_dict())
        yield EpochResult(epoch + 1, epochs, train_loss, learning_rate(cfg, epoch), val, s.value, s.feasible,
                          s.violation, floor, time.perf_counter() - start, stats, final=final, state=state)


def _pilot(cfg: RunConfig, prep: Prepared, run: Run) -> tuple[Run, bool]:
    """A rule's pilot pass (SubPT's phase A): the run's first ``pilot_epochs`` epochs, whose ends
    the rule sees; then the run rebuilt from its seed, handed the pilot rule. False: it diverged."""
    for epoch in range(run.step.pilot_epochs):
        if not math.isfinite(train_epoch(run, epoch)):
            return run, False
        run.step.end_epoch(epoch)
    if not run.step.pilot_epochs:
        return run, True
    fresh = build_run(cfg, prep)
    fresh.step.after_pilot(run.step)
    return fresh, True


@torch.no_grad()
def _evaluate(run: Run, split: str, prep: Prepared) -> Accuracy:
    """Base/novel accuracy of the prompt the run evaluates (its average, if it keeps one): the
    image features of the split from the run's image source, the text under the run's autocast."""
    with run.averaging.applied(run.prompter):
        with run.precision:
            text = run.prompter.text_features(run.encoder, run.eval_bank)  # (C, D)
            images = run.source.split(split, run.prompter)
        return evaluate(images, text, prep)


@torch.no_grad()
def _final(cfg, prep, run: Run, zs_val) -> FinalResult:
    test = zs_test = None
    if prep.test is not None:
        test = _evaluate(run, "test", prep)
        zs_test = evaluate(prep.test, prep.zero_shot_text, prep)
    with run.averaging.applied(run.prompter):
        state = {k: v.detach().float().cpu().clone() for k, v in run.prompter.state_dict().items()}
    return FinalResult(test=test, zero_shot_test=zs_test, zero_shot_val=zs_val,
                       prompt=prompt_payload(cfg, prep, state))


def prompt_payload(cfg: RunConfig, prep: Prepared, state: dict[str, torch.Tensor]) -> dict:
    """The learned tensors plus plain metadata: loadable with ``torch.load(weights_only=True)``."""
    return {**state, "n_ctx": cfg.prompt.n_ctx, "class_specific": cfg.prompt.class_specific,
            "classnames": list(prep.classnames), "model": cfg.backbone.model, "pretrained": cfg.backbone.pretrained,
            "quick_gelu": prep.backbone.quick_gelu, "method": cfg.method.name, "zero_shot_template": prep.template,
            "prompter": METHODS[cfg.method.name].prompter,  # "coop": ctx is all there is; others: deep.py
            "template": "[SOS] ctx_1..ctx_M <classname> . [EOS]"}
