"""The Ray Tune trainable: a few lines around the engine's ``fit``.

``train_trial`` runs in a Ray worker process, once per trial attempt. It rebuilds the trial's run
config from the base config and the sampled parameters, trains with ``fit`` (which reads the
frozen image features from the on-disk cache the driver filled), and reports every epoch. Every
report carries a finite ``objective``, ``hm``, ``base_acc``, ``novel_acc``, ``feasible`` and
``violation`` -- a missing or NaN objective would abort the search or leave the Optuna trial
stuck RUNNING. Every report carries a checkpoint that Ray persists to the study's storage: before
the last epoch the run's state (``state.pt``, one state per seed), from which a retried or resumed
trial continues at the next epoch; the last epoch's (or a divergence's) holds the learned prompt,
the resolved config and the final metrics, for the driver to log.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gcs_tune.config import RunConfig, build_config, dump_config
from gcs_tune.engine import EpochResult, RunState, fit
from gcs_tune.objective import score, worst
from gcs_tune.prepare import Prepared, prepare

if TYPE_CHECKING:  # Ray itself is imported where it is used, in train_trial
    from ray.tune import Checkpoint

REQUIRED = ("objective", "hm", "base_acc", "novel_acc", "feasible", "violation")
STATE_FILE = "state.pt"  # in every checkpoint but the last: [RunState.to_dict() of each seed]
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
    overrides = {setup.keys[name]: value for name, value in params.items() if name in setup.keys}
    if setup.device:
        overrides["backbone.device"] = setup.device
    return build_config(setup.base, overrides, source="<trial>")


def epoch_metrics(res: EpochResult, cfg: RunConfig, started_at: float) -> dict[str, float]:
    """``res.metrics()`` made safe to report: required keys finite (a non-finite one marks the
    trial diverged with the worst objective), other non-finite values dropped."""
    raw = res.metrics()
    out = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if any(k not in out for k in REQUIRED):
        bad = worst(cfg.objective.penalty)
        out.update(objective=bad.value, hm=0.0, base_acc=0.0, novel_acc=0.0, feasible=0.0,
                   violation=bad.violation, diverged=1.0)
    out.update(epochs=float(cfg.schedule.epochs), started_at=started_at)
    return out


def write_outputs(folder: Path, cfg: RunConfig, res: EpochResult, metrics: dict) -> None:
    """prompt.pt, config.yaml and final.json of a finished trial into ``folder``."""
    dump_config(cfg, folder / "config.yaml")
    (folder / "final.json").write_text(json.dumps(metrics, indent=2))
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


def seed_mean(per_seed: list[dict[str, float]], cfg: RunConfig) -> dict[str, float]:
    """One report from the same epoch of several seeds: every metric averaged, the objective
    scored again on the mean accuracies (as an average row), the seeds' spread of HM kept."""
    if len(per_seed) == 1:
        return per_seed[0]
    keys = set.intersection(*(set(m) for m in per_seed))
    out = {k: statistics.fmean(m[k] for m in per_seed) for k in keys}
    if any(m.get("diverged", 0.0) >= 0.5 for m in per_seed):
        bad = worst(cfg.objective.penalty)
        return {**out, "objective": bad.value, "feasible": 0.0, "violation": bad.violation, "diverged": 1.0}
    floors = [m["floor"] for m in per_seed if "floor" in m]
    s = score(out["base_acc"], out["novel_acc"], statistics.fmean(floors) if floors else None, cfg.objective.penalty)
    se = {k: math.sqrt(sum(m[k] ** 2 for m in per_seed)) / len(per_seed) for k in ("base_acc_se", "novel_acc_se") if k in keys}
    return {**out, **se, "hm": s.hm, "objective": s.value, "feasible": float(s.feasible), "violation": s.violation,
            "hm_seed_std": statistics.stdev(m["hm"] for m in per_seed), "seeds": float(len(per_seed))}


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
    for results in zip(*runs):  # the seeds advance epoch by epoch together: ASHA sees their mean
        res = results[0]
        metrics = seed_mean([epoch_metrics(r, cfg, started_at) for r in results], cfg)
        ends = any(r.final is not None or r.diverged for r in results)
        with tempfile.TemporaryDirectory() as tmp:
            if ends:
                write_outputs(Path(tmp), cfg, res, metrics)
            else:
                torch.save([r.state.to_dict() for r in results], Path(tmp) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if ends:
            return


def run_reference(base: dict[str, Any], device: str | None, threads: int) -> list[dict[str, float]]:
    """Train the CoOp reference (GCSCoOp with rho = 0 is CoOp) with the study's budget; the
    per-epoch metrics, the last one with the final validation base accuracy. Runs as a Ray task
    with a trial's resources, before the study starts."""
    torch.set_num_threads(max(1, threads))
    overrides = {"method.name": "coop", "objective.floor": "none", "objective.value": None}
    if device:
        overrides["backbone.device"] = device
    cfg = build_config(base, overrides, source="<reference>")
    started_at = time.time()
    return [epoch_metrics(res, cfg, started_at) for res in fit(cfg)]
