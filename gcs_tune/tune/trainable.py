"""The Ray Tune trainable: a few lines around the engine's ``fit``.

``train_trial`` runs in a Ray worker process, once per trial attempt. It rebuilds the trial's run
config from the base config and the sampled parameters, trains with ``fit`` (which reads the
frozen image features from the on-disk cache the driver filled), and reports every epoch. Every
report is a :class:`TrialReport` with a finite ``objective``, ``hm``, ``base_acc``, ``novel_acc``
and ``violation`` -- a missing or NaN objective would abort the search or leave the Optuna trial
stuck RUNNING. Reports carry checkpoints that Ray persists to the study's storage: before the
last epoch the run's state (``state.pt``, one state per seed; at most every CHECKPOINT_EVERY_S),
from which a retried or resumed trial continues at the next epoch; the last epoch's (or a
divergence's) holds the learned prompt, the resolved config and the final metrics, for the
driver to log.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gcs_tune.config import RunConfig, build_config, dump_config
from gcs_tune.engine import EpochResult, RunState, fit
from gcs_tune.objective import score, worst
from gcs_tune.prepare import Prepared, prepare
from gcs_tune.tune.space import apply_values
from gcs_tune.tune.trial import TrialReport

if TYPE_CHECKING:  # Ray itself is imported where it is used, in train_trial
    from ray.tune import Checkpoint

STATE_FILE = "state.pt"  # in every checkpoint but the last: [RunState.to_dict() of each seed]
# A state checkpoint at the first epoch that ends this long after the last one: every epoch of a
# real run (seconds to minutes each), while the lab's sub-second epochs do not pay Ray's forced
# experiment snapshot per checkpoint (+15 % wall time on a 12-trial lab search when every epoch saved).
CHECKPOINT_EVERY_S = float(os.environ.get("GCS_TUNE_CHECKPOINT_EVERY_S", 10))
_PREPARED: dict[str, Prepared] = {}  # per worker process, reused by the trials it runs (one per seed)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, passed by Ray with ``tune.with_parameters``."""

    base: dict[str, Any]  # the base run config tree, paths absolute, objective.value filled in
    keys: dict[str, str]  # searched short name -> dotted run config key
    threads: int = 1  # torch CPU threads of one trial (its CPU share)
    device: str | None = None  # "cpu" when the search has no GPUs (--gpus 0)
    seeds_per_trial: int = 1  # a trial's score is the mean over seeds seed, seed+1, ...


def trial_config(setup: TrialSetup, params: dict[str, Any]) -> RunConfig:
    """The run config of one trial: the base plus the sampled values under their config keys."""
    base = build_config(setup.base, {"backbone.device": setup.device} if setup.device else {}, source="<trial>")
    return apply_values(setup.keys, base, params)


def epoch_metrics(res: EpochResult, cfg: RunConfig, started_at: float) -> TrialReport:
    """``res.metrics()`` made safe to report: a non-finite objective or accuracy marks the trial
    diverged with the worst objective (other non-finite values are not reported)."""
    out = replace(TrialReport.from_ray(res.metrics()), epochs=cfg.schedule.epochs, started_at=started_at)
    if not all(map(math.isfinite, (out.objective, out.hm, out.base_acc, out.novel_acc, out.violation))):
        bad = worst(cfg.objective.penalty)
        out = replace(out, objective=bad.value, hm=0.0, base_acc=0.0, novel_acc=0.0, feasible=False,
                      violation=bad.violation, diverged=True)
    return out


def write_outputs(folder: Path, cfg: RunConfig, res: EpochResult, report: TrialReport) -> None:
    """prompt.pt, config.yaml and final.json of a finished trial into ``folder``."""
    dump_config(cfg, folder / "config.yaml")
    (folder / "final.json").write_text(json.dumps(report.to_ray(), indent=2))
    if res.final is not None:
        torch.save(res.final.prompt, folder / "prompt.pt")


def prepare_key(cfg: RunConfig) -> str:
    """What ``prepare`` reads: data, backbone, seed and the hand-crafted prompt. Trials differing
    only in method, optimiser, schedule or context share one Prepared."""
    tree = cfg.to_dict()
    return json.dumps({"data": tree["data"], "backbone": tree["backbone"], "seed": tree["seed"],
                       "template": tree["prompt"]["zero_shot_template"]}, sort_keys=True)


def prepared(cfgs: list[RunConfig]) -> list[Prepared]:
    """``prepare`` of each config (one per seed), kept for the next trial of this worker (Ray
    reuses trial actors): trials that differ only in what they train share them."""
    keys = [prepare_key(c) for c in cfgs]
    for stale in set(_PREPARED) - set(keys):
        del _PREPARED[stale]
    for key, cfg in zip(keys, cfgs):
        if key not in _PREPARED:
            _PREPARED[key] = prepare(cfg)
    return [_PREPARED[k] for k in keys]


def seed_mean(per_seed: list[TrialReport], cfg: RunConfig) -> TrialReport:
    """One report from the same epoch of several seeds: every metric averaged, the objective
    scored again on the mean accuracies (as an average row), the seeds' spread of HM kept."""
    if len(per_seed) == 1:
        return per_seed[0]
    numbers = [r.to_ray() for r in per_seed]
    keys = set.intersection(*(set(m) for m in numbers))
    out = TrialReport.from_ray({k: statistics.fmean(m[k] for m in numbers) for k in keys})
    if any(r.diverged for r in per_seed):
        bad = worst(cfg.objective.penalty)
        return replace(out, objective=bad.value, feasible=False, violation=bad.violation, diverged=True)
    floors = [r.floor for r in per_seed if math.isfinite(r.floor)]
    s = score(out.base_acc, out.novel_acc, statistics.fmean(floors) if floors else None, cfg.objective.penalty)
    se = [math.sqrt(sum(x ** 2 for x in xs)) / len(per_seed)
          for xs in ([r.base_acc_se for r in per_seed], [r.novel_acc_se for r in per_seed])]
    return replace(out, hm=s.hm, objective=s.value, feasible=s.feasible, violation=s.violation, base_acc_se=se[0],
                   novel_acc_se=se[1], hm_seed_std=statistics.stdev(r.hm for r in per_seed), seeds=len(per_seed))


def saved_states(checkpoint: Checkpoint | None, seeds: int) -> list[RunState | None]:
    """The run state of each seed in the trial's last checkpoint (``tune.get_checkpoint()``), or
    none to resume from: no checkpoint yet, or one without a state."""
    if checkpoint is None:
        return [None] * seeds
    with checkpoint.as_directory() as folder:
        path = Path(folder) / STATE_FILE
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    if saved is None:
        return [None] * seeds
    if len(saved) != seeds:
        raise ValueError(f"{checkpoint.path}: {len(saved)} seed states for a trial of {seeds} seeds")
    return [RunState.from_dict(s) for s in saved]


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: called by Ray in a worker, once per trial attempt.

    A retried or resumed trial continues after the epoch of its last checkpoint, with the results
    an uninterrupted trial gives (``fit(resume=...)``). One that failed before its first report
    starts again from epoch 1, and Ray's ``training_iteration`` then runs ahead of ``epoch``: ASHA
    uses ``epoch``."""
    from ray import tune

    torch.set_num_threads(max(1, setup.threads))
    cfg = trial_config(setup, config)
    cfgs = [cfg.replace(seed=cfg.seed + k) for k in range(setup.seeds_per_trial)]
    states = saved_states(tune.get_checkpoint(), len(cfgs))
    started_at = time.time()
    runs = [fit(c, p, resume=s) for c, p, s in zip(cfgs, prepared(cfgs), states)]
    saved_at = time.time()
    for results in zip(*runs):  # the seeds advance epoch by epoch together: ASHA sees their mean
        res = results[0]
        report = seed_mean([epoch_metrics(r, cfg, started_at) for r in results], cfg)
        ends = any(r.final is not None or r.diverged for r in results)
        if not ends and time.time() - saved_at < CHECKPOINT_EVERY_S:
            tune.report(report.to_ray())
            continue
        saved_at = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            if ends:
                write_outputs(Path(tmp), cfg, res, report)
            else:
                torch.save([r.state.to_dict() for r in results], Path(tmp) / STATE_FILE)
            tune.report(report.to_ray(), checkpoint=tune.Checkpoint.from_directory(tmp))
        if ends:
            return


def run_reference(base: dict[str, Any], device: str | None, threads: int) -> list[TrialReport]:
    """Train the CoOp reference (GCSCoOp with rho = 0 is CoOp) with the study's budget; the
    per-epoch reports, the last one with the final validation base accuracy. Runs as a Ray task
    with a trial's resources, before the study starts."""
    torch.set_num_threads(max(1, threads))
    overrides = {"method.name": "coop", "objective.floor": "none", "objective.value": None}
    if device:
        overrides["backbone.device"] = device
    cfg = build_config(base, overrides, source="<reference>")
    started_at = time.time()
    return [epoch_metrics(res, cfg, started_at) for res in fit(cfg)]
