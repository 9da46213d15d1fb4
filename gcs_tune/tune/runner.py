"""One study from start (or resume) to its summary: validate, connect, plan resources, fill the
feature cache, run the CoOp reference, then Ray Tune with the Optuna searcher, ASHA and the
driver-side callback. ``gcs_tune.search`` is the command line around :func:`run_search`."""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from gcs_tune.config import ConfigError
from gcs_tune.tune import cluster
from gcs_tune.tune.callbacks import LOG_FILES, StudyCallback
from gcs_tune.tune.finish import Outcome, console, finish_study, log_reference
from gcs_tune.tune.optuna_study import check_storage_url
from gcs_tune.tune.searcher import build_searcher, concurrency_cap
from gcs_tune.tune.space import Space, SpaceFile
from gcs_tune.tune.study import (LOCK_FILE, StudyDir, StudyInfo, absolute_paths, is_uri, latest_study,
                                 resolve_storage)
from gcs_tune.tune.tracking import (TAG_PARENT, TAG_SELECTION, Tracker, absolute_tracking_uri, default_tracking_uri,
                                    is_server_uri)
from gcs_tune.tune.trainable import TrialSetup, run_reference, train_trial
from gcs_tune.tune.validate import load_space

DEFAULT_STORAGE = "searches"


@dataclass
class SearchOptions:
    space: str | None = None
    gpus: float | None = None  # None: every GPU of the cluster (0 on a CPU machine)
    trials: int | None = None
    address: str | None = None
    storage: str = DEFAULT_STORAGE
    tracking_uri: str | None = None
    name: str | None = None
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    live: bool = True
    dashboard: bool = False  # start Ray's dashboard (the ray[default] extra) and print its address
    optuna_storage: str = ""  # an RDB URL for the study's Optuna storage; "": <study>/optuna.db
    progress: Callable | None = None  # progress bar for the feature cache
    experiment: str | None = None  # MLflow experiment (default: the study's name); a comparison shares one
    parent_run_id: str | None = None  # the study's run becomes this run's child (a comparison's run)


def run_search(opts: SearchOptions, trainable: Callable = train_trial) -> Outcome:
    """Run (or resume) a study; returns where things went and whether it was interrupted."""
    storage = resolve_storage(opts.storage)
    study, info, space = _open_study(opts, storage)
    started = cluster.connect(opts.address, dashboard=opts.dashboard)
    held = ExitStack()
    try:
        gpus = info.gpus if info else opts.gpus
        res = space.spec.resources
        plan = cluster.plan(gpus, res.gpus_per_trial, res.cpus_per_trial, concurrency_cap(space.spec))
        console.print(f"plan: {plan.describe()}")
        given = info.tracking_uri if info else opts.tracking_uri
        tracking = absolute_tracking_uri(given) if given else _default_tracking(study, storage)
        _check_cluster(plan, storage, tracking)
        held.enter_context(study.lock())  # from here on this driver writes the study: no other may
        device = "cpu" if plan.gpus == 0 else None  # None: CUDA where the trial has a GPU
        _warm(space, device, plan, opts.progress)
        if info is None:
            info = _new_study(study, space, opts, storage, plan, tracking)
        else:  # resumed: the parent run is live again until the study ends
            Tracker.for_study(info).open_study(info.name, info.parent_run_id, {})
        if info.reference_pending:
            _reference(study, info, space, device)
        setup = TrialSetup(base=info.base, keys=space.keys(), threads=max(1, int(info.resources["cpu"])),
                           device=device, seeds_per_trial=space.spec.seeds_per_trial)
        start = time.time()
        _fit(study, info, space, setup, trainable, plan, opts.live)
        return finish_study(study, info, start)
    finally:
        held.close()
        if started:
            import ray

            ray.shutdown()


def _warm(space: Space, device: str | None, plan: cluster.Plan, progress) -> None:
    """Fill the caches on the trials' device (its precision is part of the cache key), for the
    longest schedule the space can ask for, and say what it cost: the training draws are encoded
    once per study and read by every trial."""
    base = space.base
    epochs = [r[1] for p in space.params.values() if p.key == "schedule.epochs" and (r := p.numeric_range({}))]
    if epochs:
        base = base.replace(**{"schedule.epochs": int(max(epochs))})
    trees = [base.replace(seed=base.seed + k).to_dict() for k in range(space.spec.seeds_per_trial)]
    start = time.time()
    encodings = cluster.warm_caches(trees, device, plan.resources, progress)
    drawn = sum(e.draws for e in encodings)
    views = base.data.views
    stream = f"a fresh crop per epoch, {base.schedule.epochs} draws" if views == "epoch" else f"{views} views"
    console.print(f"features: {drawn} augmentation draw(s) of {encodings[0].images} train images encoded in "
                  f"{time.time() - start:.1f} s ({stream}; the rest were cached); every trial reads them from "
                  f"the cache in {base.data.cache_dir}")


def _open_study(opts: SearchOptions, storage: str) -> tuple[StudyDir, StudyInfo | None, Space]:
    if opts.resume:
        name = opts.name or latest_study(storage)
        if not name:
            raise ConfigError(f"--resume: no study in {storage}; pass --name and --storage of the study")
        study = StudyDir(storage, name)
        if study.local.is_dir():
            with study.lock():  # a study another driver runs: say so before reading its half-written state
                pass
        info = StudyInfo.load(study)
        if opts.trials is not None and opts.trials != info.trials or opts.overrides or opts.space or opts.optuna_storage:
            raise ConfigError("--resume continues the saved study as it was: drop --space, --trials, "
                              "--optuna-storage and key=value overrides (start a new --name to change them)")
        spec = SpaceFile.model_validate(info.space)
        return study, info, Space(spec, info.base_config(), info.space_path, "", False)
    if not opts.space:
        raise ConfigError("--space FILE is required (e.g. search_spaces/demo.yaml), or --resume")
    space = load_space(opts.space, opts.overrides, opts.trials)
    space.base = absolute_paths(space.base)
    if opts.optuna_storage:
        check_storage_url(opts.optuna_storage)
    name = opts.name or f"{Path(opts.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    study = StudyDir(storage, name)
    if study.exists() or (not study.remote and study.local.exists()
                          and any(p.name != LOCK_FILE for p in study.local.iterdir())):
        raise ConfigError(f"study {name!r} already exists in {storage}: --resume --name {name} to finish it, "
                          f"or choose another --name")
    return study, None, space


def _default_tracking(study: StudyDir, storage: str) -> str:
    if is_uri(storage):
        raise ConfigError(f"--storage {storage} is a URI: give --tracking-uri (an MLflow server URI)")
    return default_tracking_uri(study.local)


def _check_cluster(plan: cluster.Plan, storage: str, tracking: str) -> None:
    if plan.nodes <= 1:
        return
    blind = [] if is_uri(storage) else cluster.nodes_not_seeing(storage)
    if blind:
        raise ConfigError(f"the Ray cluster has {plan.nodes} nodes but --storage {storage} is not shared: "
                          f"node(s) {', '.join(blind)} cannot see it; give a folder every node mounts (NFS, "
                          f"Lustre, ...) or s3://...")
    if not is_server_uri(tracking):
        raise ConfigError(f"the Ray cluster has {plan.nodes} nodes: --tracking-uri must be an MLflow server "
                          f"(http://host:5000), not {tracking}")


def _new_study(study: StudyDir, space: Space, opts: SearchOptions, storage: str, plan: cluster.Plan,
               tracking: str) -> StudyInfo:
    """Create the study folder, the parent MLflow run and study.yaml (before anything long runs,
    so an interrupted start can be resumed)."""
    study.local.mkdir(parents=True, exist_ok=True)
    artifacts = (study.local / "mlartifacts").resolve().as_uri() if tracking.startswith("sqlite:") else None
    experiment = opts.experiment or study.name
    tracker = Tracker(tracking, experiment, artifacts, tags={TAG_SELECTION: space.base.objective.selection})
    info = StudyInfo(name=study.name, storage=storage, space_path=space.source, space=space.spec.model_dump(),
                     base=space.base.to_dict(), overrides=opts.overrides, trials=space.spec.trials,
                     gpus=plan.gpus, resources=plan.resources, max_concurrent=plan.max_concurrent,
                     tracking_uri=tracking, experiment=experiment, optuna_storage=opts.optuna_storage)
    tags = {"gcs_tune.space": Path(space.source).name, **({TAG_PARENT: opts.parent_run_id} if opts.parent_run_id else {})}
    info.parent_run_id = tracker.open_study(study.name, None, tags)
    study.write("space.yaml", space.text)
    tracker.log_files(info.parent_run_id, [study.local / "space.yaml"])
    info.reference_pending = space.needs_reference
    info.save(study)
    obj = info.base["objective"]
    tracker.log_run(info.parent_run_id, params={
        **({} if space.needs_reference else {f"objective.{k}": v for k, v in obj.items()}),
        "trials": info.trials, "gpus": info.gpus, "gpus_per_trial": plan.resources.get("gpu", 0),
        "cpus_per_trial": plan.resources["cpu"], "max_concurrent": plan.max_concurrent,
        "scheduler": space.spec.scheduler.type, "searcher": f"optuna TPE seed {space.spec.seed}",
        "method": space.base.method.name, "space": Path(space.source).name})
    return info


def _reference(study: StudyDir, info: StudyInfo, space: Space, device: str | None) -> None:
    """Train the CoOp reference with the study's budget (as a Ray task with a trial's resources),
    log it as its own run, and make its validation base accuracy the floor's reference value."""
    tracker = Tracker.for_study(info)
    epochs = cluster.run_task(run_reference, info.resources, info.base, device, int(info.resources["cpu"]))
    info.reference = log_reference(tracker, info, epochs)
    info.base["objective"]["value"] = info.reference["base_acc"]
    info.reference_pending = False
    space.base = info.base_config()
    info.save(study)
    obj = info.base["objective"]
    tracker.log_run(info.parent_run_id, params={f"objective.{k}": v for k, v in obj.items()},
                    metrics={"reference_base_acc": info.reference["base_acc"],
                             "reference_novel_acc": info.reference["novel_acc"], "reference_hm": info.reference["hm"]})


def _scheduler(space: Space, epochs: int):
    sch = space.spec.scheduler
    if sch.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(sch.grace_period, epochs),
                         reduction_factor=sch.reduction_factor)


def trial_dirname(trial) -> str:
    """Short trial folder names (Ray's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


def _fit(study: StudyDir, info: StudyInfo, space: Space, setup: TrialSetup, trainable: Callable,
         plan: cluster.Plan, live: bool) -> None:
    wrapped = tune.with_resources(tune.with_parameters(trainable, setup=setup), info.resources)
    if tune.Tuner.can_restore(study.ray_path):
        tuner = tune.Tuner.restore(study.ray_path, wrapped)  # failed trials stay failed; unfinished ones resume
    else:
        callback = StudyCallback(info, setup, live=live)
        searcher = build_searcher(space, info.max_concurrent, str(study.local / "optuna.yaml"))
        tuner = tune.Tuner(
            wrapped,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(space, space.base.schedule.epochs),
                                        num_samples=info.trials, metric="objective", mode="max",
                                        trial_dirname_creator=trial_dirname, reuse_actors=True),
            run_config=tune.RunConfig(name=info.name, storage_path=info.storage, callbacks=[callback], verbose=0,
                                      log_to_file=LOG_FILES,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # per epoch: a retry continues
                                      failure_config=tune.FailureConfig(max_failures=space.spec.failure.max_failures)))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's own status table would fight the live view
    # Each trial checkpoint forces an experiment snapshot (what makes a resume exact); with trials
    # checkpointing every GCS_TUNE_CHECKPOINT_EVERY_S, several trials at once trip Ray's "snapshotting
    # triggered multiple times" warning on every search. Ray's slow-snapshot warning stays on.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner.fit()
