"""One comparison (``gcs_tune.compare``): the studies, their winners, the retrained runs and the
table, each stage saved as it finishes so that ``--resume`` continues from the first unfinished one.
Ray is started once for the whole comparison and every study and retraining shares it."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gcs_tune.config import ConfigError
from gcs_tune.runs import RunResult
from gcs_tune.stats import paired_difference, summary
from gcs_tune.tune import cluster, verdict
from gcs_tune.tune.finish import console
from gcs_tune.tune.jobs import Job, run_jobs
from gcs_tune.tune.plots import comparison_plot
from gcs_tune.tune.report import write_report
from gcs_tune.tune.results import read_table
from gcs_tune.tune.trial import TERMINAL
from gcs_tune.tune.runner import SearchOptions, run_search
from gcs_tune.tune.study import StudyDir, StudyInfo
from gcs_tune.tune.tracking import Tracker


STATE = "compare.yaml"


@dataclass(frozen=True)
class Chosen:
    """A study's winner, as the finalists stage chose it."""

    trial: int
    params: dict[str, Any]
    validation: list[float]  # mean, std of the validation objective over the finalist seeds
    lead_over_defaults: list[float] | None  # paired mean, 95 % half width; None if the defaults won


@dataclass
class ComparisonState:
    """``compare.yaml``: the settings of a comparison and what its finished stages decided."""

    spaces: list[str]
    trials: int | None
    seeds: list[int]
    gpus: float | None
    overrides: dict[str, Any]
    finalists: int
    finalist_seeds: int
    run_id: str = ""  # the comparison's MLflow run: the parent of every study's run
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    winners: dict[str, Chosen] = field(default_factory=dict)

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / STATE).is_file()

    @classmethod
    def load(cls, folder: Path) -> "ComparisonState":
        if not cls.exists(folder):
            raise ConfigError(f"--resume: no comparison in {folder} ({STATE} missing)")
        tree = yaml.safe_load((folder / STATE).read_text())
        tree["winners"] = {k: Chosen(**v) for k, v in (tree.get("winners") or {}).items()}
        return cls(**tree)

    def save(self, folder: Path) -> None:
        """Atomically: an interrupted write leaves the previous state."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{STATE}.tmp"
        tmp.write_text(yaml.safe_dump(asdict(self), sort_keys=False))
        tmp.replace(folder / STATE)


@dataclass(frozen=True)
class Line:
    """One row of the table: a space's defaults or its tuned winner, over the test seeds."""

    space: str
    setting: str  # "defaults" | "tuned"
    method: str
    results: list[RunResult]

    def values(self, key: str) -> list[float]:
        return [getattr(r, key) for r in self.results]


class Comparison:
    def __init__(self, folder: Path, state: ComparisonState, address: str | None, live: bool, progress):
        self.folder, self.state, self.address, self.live, self.progress = folder, state, address, live, progress
        self.tracking = f"sqlite:///{folder / 'mlflow.db'}"
        self.storage = str(folder / "studies")

    def run(self) -> None:
        started = cluster.connect(self.address)
        try:
            tracker = Tracker(self.tracking, self.folder.name, (self.folder / "mlartifacts").as_uri())
            state = self.state
            if not state.run_id:
                state.run_id = tracker.open_study(self.folder.name, None, {"gcs_tune.role": "comparison"})
                tracker.log_run(state.run_id, params={k: str(v) for k, v in asdict(state).items()
                                                      if k not in ("run_id", "winners")})
                state.save(self.folder)
            infos = [self.study(space) for space in state.spaces]
            for info in infos:
                if info.name not in state.winners:
                    state.winners[info.name] = self.choose(info)
                    state.save(self.folder)
            lines = self.measure(infos, state.winners)
            self.report(lines, tracker)
        finally:
            if started:
                import ray

                ray.shutdown()

    def study(self, space: str) -> StudyInfo:
        """Run, resume or reuse the study of ``space``."""
        name = Path(space).stem
        study = StudyDir(self.storage, name)
        if study.exists():
            info = StudyInfo.load(study)
            frame = read_table(study)
            if not frame.empty and int(frame["state"].isin(TERMINAL).sum()) >= info.trials:
                console.print(f"study {name}: finished earlier, reused")
                return info
            opts = SearchOptions(storage=self.storage, name=name, resume=True, live=self.live, progress=self.progress)
        else:
            s = self.state
            opts = SearchOptions(space=space, gpus=s.gpus, trials=s.trials, storage=self.storage, name=name,
                                 tracking_uri=self.tracking, overrides=dict(s.overrides), live=self.live,
                                 progress=self.progress, experiment=self.folder.name, parent_run_id=s.run_id)
        outcome = run_search(opts)
        if outcome.interrupted:
            raise KeyboardInterrupt
        return outcome.info

    def choose(self, info: StudyInfo) -> Chosen:
        study = StudyDir(info.storage, info.name)
        chosen = verdict.select(study, info, read_table(study), self.state.finalists, self.state.finalist_seeds,
                                self.address, say=console.print)
        console.print(f"[bold]{info.name}[/]: " + chosen.verdict(), soft_wrap=True)
        lead, score = chosen.lead, chosen.winner.score
        return Chosen(chosen.winner.number, chosen.winner.params, [score.mean, score.std],
                      None if lead is None else [lead.mean, lead.half_width])

    def measure(self, infos: list[StudyInfo], winners: dict[str, Chosen]) -> list[Line]:
        """Every space's defaults and winner, trained on the protocol on every test seed."""
        seeds, jobs, keys = self.state.seeds, [], []
        for info in infos:
            for setting, params in (("defaults", verdict.defaults_params(info)), ("tuned", winners[info.name].params)):
                cfg = verdict.trial_config(info, params).for_protocol()
                for s in seeds:
                    jobs.append(Job(cfg.replace(seed=s), self.folder / "final" / info.name / setting / f"seed{s}"))
                keys.append((info.name, setting))
        device = "cpu" if infos[0].gpus == 0 else None
        flat = iter(run_jobs(jobs, infos[0].resources, device, self.address, say=console.print))
        out = []
        for name, setting in keys:
            results = [next(flat) for _ in seeds]
            out.append(Line(name, setting, results[0].method, results))
        return out

    def report(self, lines: list[Line], tracker: Tracker) -> None:
        reference = next((ln for ln in lines if ln.setting == "tuned" and ln.method == "coop"),
                         next(ln for ln in lines if ln.setting == "tuned"))
        zero = verdict.zero_shot_row(lines[0].results)
        rows = [zero.cells()[:1] + ["–"] + zero.cells()[1:] + ["", ""]]
        for ln in lines:
            diff = paired_difference(ln.values("hm"), reference.values("hm")) if ln is not reference else None
            secs = summary(ln.values("seconds")).mean
            rows.append([f"{ln.space} ({ln.method})", ln.setting, str(summary(ln.values("base_acc"))),
                         str(summary(ln.values("novel_acc"))), str(summary(ln.values("hm"))),
                         "reference" if diff is None else f"{diff}{' *' if diff.significant else ''}", f"{secs:.0f}"])
        seeds = ",".join(map(str, self.state.seeds))
        md = verdict.markdown(["space (method)", "setting", "base", "novel", "HM", f"ΔHM vs {reference.space} tuned",
                               "s / run"], rows)
        text = (f"# {self.folder.name}: test split, seeds {seeds}, mean ± std\n\n{md}\n"
                f"ΔHM: paired over the seeds, ± the half width of its 95 % interval; * marks an interval that "
                f"excludes 0. Each study: {self.state.trials or 'its own'} trials, winner from "
                f"{self.state.finalists} finalists re-run on {self.state.finalist_seeds} extra validation seeds.\n")
        (self.folder / "table.md").write_text(text)
        long = [{"space": ln.space, "setting": ln.setting, "method": ln.method, **{k: getattr(r, k) for k in
                ("seed", "base_acc", "novel_acc", "hm", "seconds", "zero_shot_base_acc", "zero_shot_novel_acc")}}
                for ln in lines for r in ln.results]
        pd.DataFrame(long).to_parquet(self.folder / "table.parquet", index=False)
        plot = comparison_plot([(f"{ln.space} {ln.setting}", ln.values("base_acc"), ln.values("novel_acc"))
                                for ln in lines], zero.base, zero.novel,
                               self.folder / "base_vs_novel.png")
        run_id = self.state.run_id
        tracker.log_run(run_id, metrics={f"test_hm.{ln.space}.{ln.setting}": summary(ln.values("hm")).mean
                                         for ln in lines if not math.isnan(summary(ln.values("hm")).mean)})
        tracker.log_files(run_id, [self.folder / "table.md", self.folder / "table.parquet", plot])
        tracker.finish(run_id)
        console.print(text, soft_wrap=True)
        console.print(f"written {self.folder / 'table.md'}, table.parquet, base_vs_novel.png; "
                      f"mlflow ui --backend-store-uri {self.tracking}", soft_wrap=True)
        console.print(f"report: {write_report(self.folder)}", soft_wrap=True)
