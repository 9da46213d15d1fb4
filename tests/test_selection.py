"""Selection that never sees the novel classes, and selection that is not noise.

The pseudo_novel test wraps the lab's images so that loading any image of a novel class raises,
then runs every data path a search takes (the warm-up's prepare, the CoOp reference, a trial)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

import gcs_tune.prepare as prepare_module
from gcs_tune.config import load_config
from gcs_tune.data.fewshot import base_novel_split, pseudo_novel_order
from gcs_tune.data.types import DatasetSplits, ImageSet
from gcs_tune.engine import Accuracy, fit, standard_error
from gcs_tune.prepare import prepare
from gcs_tune.stats import paired_difference
from gcs_tune.tune.validate import load_space
from gcs_tune.tune.trainable import TrialSetup, run_reference, seed_mean, trial_config
from gcs_tune.tune.trial import TrialReport
from gcs_tune.tune.verdict import Finalist, choose, finalist_rows, lead_over_defaults


class NovelImageRead(RuntimeError):
    """Raised by the trap: a novel-class image was loaded (not an OSError: nothing may skip it)."""


class Trap:
    def __init__(self, load, labels, novel):
        self.load, self.labels, self.novel = load, labels, novel

    def __call__(self, i):
        if self.labels[i] in self.novel:
            raise NovelImageRead(f"image {i} of novel class {self.labels[i]} was read")
        return self.load(i)


@pytest.fixture
def trapped(monkeypatch):
    real = prepare_module.load_dataset

    def load(cfg):
        splits = real(cfg)
        novel = set(base_novel_split(len(splits.classnames))[1])
        wrap = lambda s: ImageSet(s.ids, s.labels, Trap(s.load, s.labels, novel))  # noqa: E731
        return DatasetSplits(splits.name, splits.classnames, wrap(splits.train), wrap(splits.val), wrap(splits.test))
    monkeypatch.setattr(prepare_module, "load_dataset", load)


def test_a_pseudo_novel_search_never_reads_a_novel_image(trapped, tmp_path, fast_space):
    space = load_space(fast_space(tmp_path, base={
        "backbone": {"model": "lab-vit-tiny"}, "method": {"name": "gcscoop"}, "schedule": {"epochs": 1},
        "data": {"dataset": "lab", "shots": 2, "views": 1, "cache_dir": str(tmp_path / "cache")}}))
    assert space.base.data.split == "pseudo_novel" and not space.base.eval.test  # the default of every space
    warm = prepare(space.base)  # what the search's warm-up encodes
    from gcs_tune.data.lab import LAB_CLASSNAMES
    assert sorted(warm.classnames) == sorted(LAB_CLASSNAMES[:32])  # the base classes only
    run_reference(space.base.to_dict(), "cpu", 1)  # the CoOp reference that sets the floor
    setup = TrialSetup(base=space.base.to_dict(), keys=space.keys(), device="cpu")
    last = list(fit(trial_config(setup, {"rho": 0.05, "n_ctx": 2, "lr": 0.005})))[-1]  # a trial
    assert math.isfinite(last.val.hm) and last.final.test is None  # no test split in a search
    with pytest.raises(NovelImageRead):  # the trap works: the protocol's measurement reads novel images
        prepare(space.base.for_protocol())


def test_pseudo_split_halves_the_base_classes_and_keeps_their_shots(fast_cfg):
    real = prepare(fast_cfg(**{"data.split": "base_novel"}))
    pseudo = prepare(fast_cfg(**{"data.split": "pseudo_novel"}))
    order = pseudo_novel_order(64, 0)
    assert sorted(order) == list(range(32)) and pseudo.classnames == tuple(real.classnames[y] for y in order)
    assert (pseudo.base, pseudo.novel) == (range(0, 16), range(16, 32))
    assert int(pseudo.train.labels.max()) < 16  # trained on pseudo-base only
    assert pseudo.val.labels.unique().tolist() == list(range(32))  # scored on both halves of the base classes
    assert pseudo.test is None or not pseudo.test.labels.numel() or int(pseudo.test.labels.max()) < 32


def test_all_classes_selection_is_todays_protocol_and_labelled(fast_space, tmp_path):
    space = load_space(fast_space(tmp_path, objective={"selection": "all_classes", "floor": "none"}))
    assert space.base.data.split == "base_novel" and space.base.objective.selection == "all_classes"
    assert space.base.for_protocol().eval.test


def test_validation_accuracies_carry_their_binomial_standard_error():
    acc = Accuracy(75.0, 50.0, n_base=128, n_novel=100)
    assert math.isclose(acc.base_se, 100 * math.sqrt(0.75 * 0.25 / 128))
    assert math.isclose(acc.novel_se, 5.0)  # 8 images per class x 12.5 classes: one image is 1 point
    assert math.isnan(standard_error(50.0, 0))


def test_seed_mean_scores_the_mean_accuracies():
    a = {"base_acc": 80.0, "novel_acc": 60.0, "hm": 68.57, "objective": 68.57, "feasible": 1.0, "violation": 0.0,
         "diverged": 0.0, "floor": 70.0, "base_acc_se": 3.0, "novel_acc_se": 4.0}
    b = {**a, "base_acc": 60.0, "novel_acc": 70.0, "hm": 64.6}
    m = seed_mean([TrialReport.from_ray(a), TrialReport.from_ray(b)], load_config()).to_ray()
    assert m["base_acc"] == 70.0 and m["novel_acc"] == 65.0
    assert math.isclose(m["hm"], 2 * 70 * 65 / 135) and m["feasible"] == 1.0  # 70 >= the floor 70
    assert math.isclose(m["base_acc_se"], math.sqrt(18) / 2) and m["hm_seed_std"] > 0


def finalist(number, objective, default=False):
    return Finalist(number, {"rho": 0.1 * (number + 1)}, default, [1, 2, 3], objective, objective, objective, objective)


def test_the_winner_is_the_best_mean_and_its_lead_is_judged_against_noise():
    defaults = finalist(0, [60.0, 61.0, 59.0], default=True)
    lucky = finalist(3, [66.0, 55.0, 56.0])  # best on the search's seed, worse on average
    steady = finalist(5, [62.0, 63.0, 61.5])
    assert choose([defaults, lucky, steady]) is steady
    lead = lead_over_defaults(steady, [defaults, lucky, steady])
    assert lead.n == 3 and math.isclose(lead.mean, 2.1666, rel_tol=1e-3) and lead.significant
    assert not paired_difference(lucky.objective, defaults.objective).significant


def test_finalists_are_the_top_trials_plus_the_defaults():
    frame = pd.DataFrame([{"number": i, "state": "complete", "feasible": 1.0, "hm": hm, "base_acc": 70.0,
                           "is_default": i == 0} for i, hm in enumerate([50.0, 70.0, 65.0, 69.0, 10.0])]
                         + [{"number": 5, "state": "pruned", "feasible": 1.0, "hm": 99.0, "base_acc": 99.0,
                             "is_default": False}])
    assert [r["number"] for r in finalist_rows(frame, 2)] == [1, 3, 0]  # pruned trials never compete
    assert [r["number"] for r in finalist_rows(frame, 5)] == [1, 3, 2, 0, 4]



def test_defaults_stopped_early_are_still_a_finalist_rerun_on_the_search_seed(tmp_path):
    """ASHA may stop the defaults' trial; the verdict still needs its lead, so the defaults are
    re-run on the search's own seed as well as the extra seeds, never scored on a partial run."""
    from types import SimpleNamespace

    from gcs_tune.tune.verdict import finalist_jobs, score_finalists

    frame = pd.DataFrame([{"number": 0, "state": "pruned", "feasible": 1.0, "hm": 40.0, "objective": 40.0,
                           "base_acc": 50.0, "novel_acc": 33.0, "is_default": True, "rho": 0.1},
                          {"number": 1, "state": "complete", "feasible": 1.0, "hm": 70.0, "objective": 70.0,
                           "base_acc": 80.0, "novel_acc": 62.0, "is_default": False, "rho": 0.3}])
    rows = finalist_rows(frame, 1)
    assert [r["number"] for r in rows] == [1, 0]
    info = SimpleNamespace(base=load_config(None, {"seed": 1}).to_dict(), name="s",
                           space={"params": {"rho": {"key": "method.rho"}}})
    jobs = finalist_jobs(info, rows, [2, 3], tmp_path)
    assert [j.out.name for j in jobs] == ["seed2", "seed3", "seed1", "seed2", "seed3"]
    assert [j.cfg.seed for j in jobs] == [2, 3, 1, 2, 3]
    results = [SimpleNamespace(objective=v, val_hm=v, val_base_acc=v, val_novel_acc=v)
               for v in (71.0, 72.0, 60.0, 61.0, 62.0)]  # what score_finalists reads of a RunResult
    top, defaults = score_finalists(info, rows, [2, 3], results)
    assert top.objective == [70.0, 71.0, 72.0] and defaults.objective == [60.0, 61.0, 62.0]
    assert defaults.seeds == [1, 2, 3] and lead_over_defaults(top, [top, defaults]).mean == 10.0

def test_paired_difference_interval_is_students_t():
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert math.isclose(d.mean, 2.0) and math.isclose(d.half_width, 4.302653 * 1.0 / math.sqrt(3), rel_tol=1e-5)
    assert math.isnan(paired_difference([1.0], [0.0]).half_width)
