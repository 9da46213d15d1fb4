"""From a finished study to an answer: finalists re-run on extra seeds (validation only, in the
study's selection protocol), the winner chosen by their mean, then the winner, the paper defaults
and the CoOp reference retrained on the protocol (all base classes) and measured on the test split
over seeds, with zero-shot beside them. Training runs go through :mod:`gcs_tune.tune.jobs`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gcs_tune.config import RunConfig, build_config
from gcs_tune.objective import harmonic_mean
from gcs_tune.runs import RunResult
from gcs_tune.stats import Difference, Summary, paired_difference, summary
from gcs_tune.tune.jobs import Job, run_jobs
from gcs_tune.tune.results import rank, trial_params
from gcs_tune.tune.space import apply_values
from gcs_tune.tune.study import StudyDir, StudyInfo
from gcs_tune.tune.trial import TrialState


def trial_config(info: StudyInfo, params: dict[str, Any]) -> RunConfig:
    """A trial's run config as the search trained it (its selection protocol, its seed)."""
    keys = {name: p["key"] for name, p in info.space["params"].items()}
    return apply_values(keys, build_config(info.base, source=f"{info.name}: trial"), params)


def defaults_params(info: StudyInfo) -> dict[str, Any]:
    return dict(info.space.get("defaults") or {})


# ---------------------------------------------------------------- finalists


@dataclass(frozen=True)
class Finalist:
    number: int  # trial number (-1: the defaults, when no trial ran them)
    params: dict[str, Any]
    is_default: bool
    seeds: list[int]
    objective: list[float]  # validation objective per seed, the search's own seed(s) first
    hm: list[float]
    base: list[float]
    novel: list[float]

    @property
    def score(self) -> Summary:
        return summary(self.objective)


def finalist_rows(frame: pd.DataFrame, k: int) -> list[dict[str, Any]]:
    """The top ``k`` complete trials by the winner rule, plus the defaults' trial if it is not one
    -- even when the scheduler stopped it early: then it is re-run on the search's seed as well."""
    records = frame.to_dict("records") if not frame.empty else []
    top = sorted((r for r in records if r["state"] == TrialState.COMPLETE), key=lambda r: rank(r, r["number"]))[:k]
    default = [r for r in records if r.get("is_default") and r["state"] in (TrialState.COMPLETE, TrialState.PRUNED)]
    if default and all(r["number"] != default[0]["number"] for r in top):
        top.append(default[0])
    return top


def _stopped_early(row: dict[str, Any]) -> bool:
    """A finalist whose search run did not reach the last epoch: its own seed is re-run too."""
    return row["state"] != TrialState.COMPLETE


def extra_seeds(info: StudyInfo, n: int) -> list[int]:
    """Seeds the search never trained on: after the trial's own seed(s)."""
    first = int(info.base["seed"]) + int(info.space.get("seeds_per_trial", 1))
    return list(range(first, first + n))


def finalist_jobs(info: StudyInfo, rows: list[dict[str, Any]], seeds: list[int], folder: Path) -> list[Job]:
    """Validation-only re-runs (no test split, whatever the selection protocol)."""
    own = [int(info.base["seed"])]
    return [Job(trial_config(info, trial_params(r)).replace(**{"seed": s, "out": None, "eval.test": False}),
                folder / f"trial-{int(r['number']):03d}" / f"seed{s}")
            for r in rows for s in (own if _stopped_early(r) else []) + seeds]


def score_finalists(info: StudyInfo, rows: list[dict[str, Any]], seeds: list[int],
                    results: list[RunResult]) -> list[Finalist]:
    """Each finalist's validation numbers: the search's own run first, then the extra seeds."""
    out, it = [], iter(results)
    own = [int(info.base["seed"])]
    for r in rows:
        runs = [next(it) for _ in (own if _stopped_early(r) else []) + seeds]
        first = [] if _stopped_early(r) else [(r["objective"], r["hm"], r["base_acc"], r["novel_acc"])]
        values = first + [(x.objective, x.val_hm, x.val_base_acc, x.val_novel_acc) for x in runs]
        objective, hm, base, novel = (list(v) for v in zip(*values))
        out.append(Finalist(int(r["number"]), trial_params(r), bool(r.get("is_default")), own + seeds,
                            objective, hm, base, novel))
    return out


def choose(finalists: list[Finalist]) -> Finalist:
    """The best mean validation objective (penalised below the floor); ties by earlier trial."""
    return max(finalists, key=lambda f: (f.score.mean, -f.number))


def lead_over_defaults(winner: Finalist, finalists: list[Finalist]) -> Difference | None:
    """The winner's paired lead over the defaults' trial on the same seeds, or None."""
    default = next((f for f in finalists if f.is_default), None)
    if default is None or default is winner:
        return None
    return paired_difference(winner.objective, default.objective)


@dataclass(frozen=True)
class Selection:
    winner: Finalist
    finalists: list[Finalist]
    lead: Difference | None  # the winner's paired validation lead over the defaults

    def table(self) -> list[list[str]]:
        return [[f"{f.number}{' (defaults)' if f.is_default else ''}", values_text(f.params), str(f.score),
                 str(summary(f.hm)), str(summary(f.base)), str(summary(f.novel))] for f in self.finalists]

    def markdown(self, title: str) -> str:
        table = markdown(["trial", "values", "objective", "HM", "base", "novel"], self.table())
        return (f"# {title}: finalists, validation (selection protocol of the study), seeds "
                f"{self.finalists[0].seeds}, mean ± std\n\n{table}\n{self.verdict()}\n")

    def verdict(self) -> str:
        line = f"winner: trial {self.winner.number}, validation objective {self.winner.score}"
        if self.winner.is_default:
            line += " -- the paper defaults themselves: no finalist beat them on the mean"
        elif self.lead is not None:
            noise = ("larger than its noise" if self.lead.significant
                     else "NOT larger than its noise (the 95 % interval includes 0)")
            line += f"; lead over the defaults {self.lead} (paired over {self.lead.n} seeds): {noise}"
        return line


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def values_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}" for n, v in params.items())


def select(study: StudyDir, info: StudyInfo, frame: pd.DataFrame, k: int, n_seeds: int,
           address: str | None = None, say=print) -> Selection:
    """Re-run the top ``k`` trials (and the defaults) on ``n_seeds`` new seeds, validation only,
    in the study's selection protocol; the winner is the best mean. ``k = 0``: the single-seed
    winner, re-run nowhere."""
    rows = finalist_rows(frame, max(k, 1))
    seeds = extra_seeds(info, n_seeds) if k > 0 else []
    jobs = finalist_jobs(info, rows, seeds, study.local / "finalists")
    results = run_jobs(jobs, info.resources, "cpu" if info.gpus == 0 else None, address, say=say)
    finalists = score_finalists(info, rows, seeds, results)
    winner = choose(finalists)
    chosen = Selection(winner, finalists, lead_over_defaults(winner, finalists))
    (study.local / "finalists.md").write_text(chosen.markdown(info.name))
    return chosen


# ---------------------------------------------------------------- the test table


@dataclass(frozen=True)
class Row:
    label: str  # "winner (trial 7)", "defaults", "CoOp reference", "zero-shot"
    seeds: list[int]
    base: list[float]
    novel: list[float]
    hm: list[float]
    params: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        return [self.label] + [str(summary(v)) for v in (self.base, self.novel, self.hm)]


def final_jobs(info: StudyInfo, params: dict[str, Any], seeds: list[int], folder: Path) -> dict[str, list[Job]]:
    """The runs of the test table: the winner, the defaults, and CoOp at the study's recipe."""
    cfgs = {"winner": trial_config(info, params), "defaults": trial_config(info, defaults_params(info))}
    coop = trial_config(info, {}).replace(**{"method.name": "coop"})
    if cfgs["defaults"].method.name != "coop":
        cfgs["coop"] = coop
    return {label: [Job(cfg.for_protocol().replace(seed=s), folder / label / f"seed{s}") for s in seeds]
            for label, cfg in cfgs.items()}


def measure(info: StudyInfo, params: dict[str, Any], seeds: list[int], folder: Path, address: str | None = None,
            say=print) -> dict[str, list[RunResult]]:
    """Train the winner, the defaults and CoOp on every seed (resuming what is done); results by row."""
    groups = final_jobs(info, params, seeds, folder)
    flat = iter(run_jobs([j for jobs in groups.values() for j in jobs], info.resources,
                         "cpu" if info.gpus == 0 else None, address, say=say))
    return {label: [next(flat) for _ in jobs] for label, jobs in groups.items()}


def test_rows(results: dict[str, list[RunResult]], labels: dict[str, str]) -> list[Row]:
    """One row per trained config plus zero-shot (the same for every seed's test split)."""
    rows = []
    for key, runs in results.items():
        rows.append(Row(labels.get(key, key), [r.seed for r in runs], [r.base_acc for r in runs],
                        [r.novel_acc for r in runs], [r.hm for r in runs]))
    rows.insert(0, zero_shot_row(next(iter(results.values()))))
    return rows


def zero_shot_row(runs: list[RunResult]) -> Row:
    """Zero-shot on the test split, as measured beside each run (the same for every seed)."""
    zb, zn = [r.zero_shot_base_acc for r in runs], [r.zero_shot_novel_acc for r in runs]
    return Row("zero-shot", [r.seed for r in runs], zb, zn, [harmonic_mean(b, n) for b, n in zip(zb, zn)])


def test_se(result: RunResult) -> float:
    """The binomial standard error of a test HM, from its halves' (first-order, independent halves)."""
    b, n, sb, sn = result.base_acc, result.novel_acc, result.base_acc_se, result.novel_acc_se
    if None in (b, n, sb, sn) or b + n == 0:
        return math.nan
    db, dn = 2 * n * n / (b + n) ** 2, 2 * b * b / (b + n) ** 2  # ∂HM/∂B, ∂HM/∂N
    return math.sqrt((db * sb) ** 2 + (dn * sn) ** 2)


@dataclass(frozen=True)
class TestReport:
    rows: list[Row]
    diffs: dict[str, Difference]  # "winner − defaults" -> paired HM difference over the seeds
    se: float  # binomial standard error of one run's test HM
    text: str  # Markdown: the table and what it says


def test_report(title: str, selection: str, results: dict[str, list[RunResult]], labels: dict[str, str],
                against: str = "winner") -> TestReport:
    """The test table of ``results`` with the paired HM differences of ``against`` to every other row."""
    rows = test_rows(results, labels)
    hm = {k: [r.hm for r in v] for k, v in results.items()}
    diffs = {f"{against} − {o}": paired_difference(hm[against], hm[o]) for o in hm if o != against}
    se = summary([test_se(r) for r in results[against]]).mean
    table = markdown(["", "base", "novel", "HM"], [r.cells() for r in rows])
    notes = [f"{name}: HM {d} (95 % interval over {d.n} paired seeds: "
             f"{'larger than noise' if d.significant else 'within noise'})" for name, d in diffs.items()]
    notes.append(f"one run's test HM has a binomial standard error of about ±{se:.2f} points")
    text = f"# {title}\n\nselection: {selection}\n\n{table}\n" + "".join(f"- {n}\n" for n in notes)
    return TestReport(rows, diffs, se, text)
