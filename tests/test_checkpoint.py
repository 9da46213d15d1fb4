"""Per-epoch run states: ``fit(resume=state)`` continues a run after epoch k with the results an
uninterrupted run gives (engine, CPU, the lab model's architecture), and a Ray trial that fails
after epoch k is retried from its checkpoint at epoch k + 1 (real Ray Tune, one trial)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from gcs_tune.engine import Accuracy, EpochResult, RunState, fit
from gcs_tune.methods import caspl
from gcs_tune.prepare import prepare

# 64 training images in 4 steps an epoch (momentum and the generator carry across epochs), two
# held views per image (the draws come from the generator too), validation every 2 epochs (epoch 3
# reports epoch 2's numbers, which the state must carry). The trained lab model: a fresh Prepared
# (a new worker's) has the same weights, where the random-weight one would draw others.
SMALL = {"backbone.model": "lab", "data.shots": 2, "data.val_shots": 1, "data.lab_test_per_class": 1, "data.views": 2,
         "optim.batch_size": 16, "optim.lr": 0.05, "schedule.epochs": 4, "schedule.warmup_epochs": 1,
         "eval.every": 2}
METHOD = {
    "coop": {},
    "gcscoop": {"method.rho": 0.5, "method.beta1": 0.3, "method.beta2": 0.9},
    "subpt": {"method.subspace_epochs": 2, "method.subspace_rank": 1},  # the pilot pass and its U
    "promptsrc": {"method.gpa_mean": 2.0, "method.gpa_std": 1.0},  # Gaussian aggregation, the image tower
}
STOP = 2  # the epoch after which the run is interrupted


def numbers(res: EpochResult) -> dict[str, float]:
    """Everything a result reports but its wall time."""
    return {k: v for k, v in res.metrics().items() if k != "epoch_seconds"}


def assert_same_results(resumed: list[EpochResult], whole: list[EpochResult]) -> None:
    assert [r.epoch for r in resumed] == [r.epoch for r in whole]
    for a, b in zip(resumed, whole):
        x, y = numbers(a), numbers(b)
        assert x.keys() == y.keys(), a.epoch
        for k in x:
            assert math.isclose(x[k], y[k], rel_tol=0, abs_tol=1e-6), (a.epoch, k, x[k], y[k])
    pa, pb = resumed[-1].final.prompt, whole[-1].final.prompt
    assert pa.keys() == pb.keys()
    for k, v in pb.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(pa[k], v, rtol=0, atol=1e-6)


def round_trip(state: RunState) -> RunState:
    """The state as the trainable stores it: torch.save, then a weights-only load."""
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    return RunState.from_dict(torch.load(buf, weights_only=True))


@pytest.mark.parametrize("method", list(METHOD))
def test_a_resumed_run_gives_the_uninterrupted_runs_results(fast_cfg, method):
    cfg = fast_cfg(**{**SMALL, "method.name": method, **METHOD[method]})
    whole = list(fit(cfg, prepare(cfg)))
    assert all(r.state is not None for r in whole[:-1]) and whole[-1].state is None
    state = round_trip(whole[STOP - 1].state)
    assert state.epoch == STOP and state.val == whole[STOP - 1].val
    resumed = list(fit(cfg, prepare(cfg), resume=state))  # a fresh Prepared, as in a new worker
    assert_same_results(resumed, whole[STOP:])
    assert resumed[0].val == whole[STOP - 1].val  # epoch 3 validates no more: it repeats epoch 2's state


def test_a_resumed_cascade_does_not_run_its_stage_again(fast_cfg, monkeypatch):
    cfg = fast_cfg(**{**SMALL, "method.name": "caspl_coop", "method.teacher_model": "lab-vit-tiny",
                      "method.boost_epochs": 1, "method.boost_shots": 1, "method.boost_batch_size": 64,
                      "method.boost_n_ctx": 2})
    prep = prepare(cfg)
    whole = list(fit(cfg, prep))

    def never(*args):
        raise AssertionError("CasPL's stage 1 ran again on resume")
    monkeypatch.setitem(caspl.STAGES, "boost", never)
    resumed = list(fit(cfg, prep, resume=round_trip(whole[STOP - 1].state)))
    assert_same_results(resumed, whole[STOP:])


def test_a_state_with_nothing_left_to_train_is_refused(fast_cfg):
    cfg = fast_cfg(**SMALL)
    with pytest.raises(ValueError, match="left to train"):
        next(fit(cfg, resume=RunState(cfg.schedule.epochs, Accuracy(0.0, 0.0), {})))


# --- the trainable under Ray Tune ---------------------------------------------------------------

FAIL_AT, EPOCHS = 3, 5
COMPARED = ("objective", "hm", "base_acc", "novel_acc", "violation", "feasible", "train_loss", "lr", "hm_seed_std")


@pytest.mark.parametrize("how", ["raises", "killed"])
def test_a_failed_trial_is_retried_from_its_last_epoch(ray_cluster, tmp_path, how):
    """One trial of two seeds fails right after reporting epoch 3 on its first attempt -- it raises,
    or its process is SIGKILLed as the kernel's OOM killer does; Ray retries it (max_failures=1)
    from that report's checkpoint: the retry reports epochs 4 and 5 only, with the numbers and the
    prompt of an uninterrupted trial."""
    import os
    import signal

    from ray import tune

    from gcs_tune.config import load_config
    from gcs_tune.tune.trainable import STATE_FILE, TrialSetup, epoch_metrics, seed_mean, train_trial, trial_config

    def flaky(config, setup):  # nested: Ray pickles it by value (the test module is not importable there)
        report, first = tune.report, tune.get_checkpoint() is None

        def report_then_fail(metrics, checkpoint=None):
            report(metrics, checkpoint=checkpoint)
            if first and metrics["epoch"] == FAIL_AT:
                if how == "killed":
                    os.kill(os.getpid(), signal.SIGKILL)  # no exception, no clean-up: the process is gone
                raise RuntimeError(f"injected failure after epoch {FAIL_AT}")
        tune.report = report_then_fail  # train_trial looks it up on the module at each call
        try:
            train_trial(config, setup)
        finally:
            tune.report = report

    base = load_config(None, {**SMALL, "method.name": "gcscoop", "schedule.epochs": EPOCHS, "objective.floor": "none",
                              "data.cache_dir": str(tmp_path / "cache")}).to_dict()
    setup = TrialSetup(base=base, keys={"lr": "optim.lr"}, threads=1, device="cpu", seeds_per_trial=2)
    tuner = tune.Tuner(tune.with_parameters(flaky, setup=setup), param_space={"lr": 0.05},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="retry", verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=1),
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    result = tuner.fit()[0]
    assert result.error is None
    rows = result.metrics_dataframe  # every report of both attempts, in order
    assert rows["epoch"].tolist() == list(range(1, EPOCHS + 1))  # not 1, 2, 3, 1, 2, ...: epoch 4 came next
    starts = rows["started_at"].tolist()
    assert starts[FAIL_AT] > starts[FAIL_AT - 1]  # ... from a second attempt

    cfg = trial_config(setup, {"lr": 0.05})
    cfgs = [cfg.replace(seed=cfg.seed + k) for k in range(2)]
    whole = list(zip(*(fit(c, prepare(c)) for c in cfgs)))
    for (_, row), results in zip(rows.iterrows(), whole):
        expected = seed_mean([epoch_metrics(r, cfg, 0.0) for r in results], cfg).to_ray()
        for k in COMPARED:
            assert math.isclose(row[k], expected[k], rel_tol=0, abs_tol=1e-6), (int(row["epoch"]), k)
    with result.checkpoint.as_directory() as folder:  # the last epoch's, as the driver reads it
        assert not (Path(folder) / STATE_FILE).exists()
        prompt = torch.load(Path(folder) / "prompt.pt", weights_only=True)
        assert {"config.yaml", "final.json"} <= {p.name for p in Path(folder).iterdir()}
    for k, v in whole[-1][0].final.prompt.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(prompt[k], v, rtol=0, atol=1e-6)
