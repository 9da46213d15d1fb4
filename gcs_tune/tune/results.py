"""The results table: one row per trial, written as Parquet beside the Ray results, and the rule
that picks the winner. No Ray, no MLflow: ``gcs_tune.best`` reads studies with this alone. A
row's state is a :class:`TrialState`, its numbers the ``TABLE_COLUMNS`` of its last
:class:`TrialReport`.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.markup import escape

from gcs_tune.tune.study import StudyDir
from gcs_tune.tune.trial import TABLE_COLUMNS, TrialReport, TrialState

TABLE = "trials.parquet"


@dataclass
class TrialRecord:
    trial_id: str
    number: int  # order of creation in the study (0 = the enqueued defaults)
    params: dict[str, Any]
    state: TrialState = TrialState.RUNNING
    is_default: bool = False
    epoch: int = 0  # epochs reported
    epochs: int = 0  # epochs planned
    report: TrialReport | None = None  # the last one
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> validation objective (Optuna's intermediate values)
    started_at: float = math.nan  # unix time the trial's last attempt started training
    ended_at: float = math.nan
    train_seconds: float = 0.0  # sum of epoch times of the last attempt
    failures: int = 0
    error: str = ""
    log: str = ""  # a failed trial's stderr file
    mlflow_run_id: str = ""
    checkpoint: str = ""

    def row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("params", "report", "curve")}
        row["duration_s"] = self.ended_at - self.started_at
        row["params_json"] = json.dumps(self.params, sort_keys=True)  # exact values, None included
        row["curve_json"] = json.dumps({str(e): v for e, v in sorted(self.curve.items())})
        row.update({f"param.{k}": v for k, v in self.params.items()})
        numbers = self.report.to_ray() if self.report else {}
        row.update({k: numbers.get(k, math.nan) for k in TABLE_COLUMNS})
        return row


def write_table(records: list[TrialRecord], study: StudyDir) -> Path:
    """Atomically (re)write the study's ``trials.parquet``; parameters as ``param.<name>`` columns."""
    rows = [r.row() for r in sorted(records, key=lambda r: r.number)]
    frame = pd.DataFrame(rows)
    for col in (c for c in frame.columns if c.startswith("param.")):
        if frame[col].map(type).nunique() > 1:  # e.g. choice of [str, None]: keep one Arrow type
            frame[col] = frame[col].map(lambda v: None if v is None else str(v))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    return study.write(TABLE, buf.getvalue())


def read_table(study: StudyDir) -> pd.DataFrame:
    raw = study.read(TABLE)
    return pd.read_parquet(io.BytesIO(raw)) if raw else pd.DataFrame()


def records_from_table(study: StudyDir) -> dict[str, TrialRecord]:
    """Rebuild the records of an earlier session (``--resume``)."""
    frame = read_table(study)
    out: dict[str, TrialRecord] = {}
    for row in frame.to_dict("records"):
        params = trial_params(row)
        numbers = {k: row[k] for k in TABLE_COLUMNS if k in row and not _missing(row[k])}
        rec = TrialRecord(trial_id=row["trial_id"], number=int(row["number"]), params=params)
        for name in ("state", "is_default", "epoch", "epochs", "started_at", "ended_at", "train_seconds",
                     "failures", "error", "log", "mlflow_run_id", "checkpoint"):
            if name in row:
                setattr(rec, name, _plain(row[name]))
        rec.state = TrialState(rec.state)
        rec.report = TrialReport.from_ray(numbers) if numbers else None
        rec.curve = {int(e): v for e, v in json.loads(row.get("curve_json") or "{}").items()}
        out[rec.trial_id] = rec
    return out


def trial_params(row: dict[str, Any]) -> dict[str, Any]:
    """The sampled values of a table row, exactly (inactive conditional parameters absent)."""
    if row.get("params_json"):
        return json.loads(row["params_json"])
    return {k[6:]: _plain(v) for k, v in row.items() if k.startswith("param.") and not _missing(v)}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


# ---------------------------------------------------------------- the winner


@dataclass(frozen=True)
class Winner:
    row: dict[str, Any]
    feasible: bool  # False: nothing met the floor; this is the least violating trial


def rank(metrics: dict[str, Any], number: int) -> tuple:
    """Sort key of the winner rule, smaller is better: feasible first, then validation HM, ties by
    base accuracy; if not feasible, the least violation, then HM; last, the earlier trial."""
    if metrics.get("feasible", 0.0) >= 0.5:
        return (0, -metrics.get("hm", 0.0), -metrics.get("base_acc", 0.0), number)
    return (1, metrics.get("violation", math.inf), -metrics.get("hm", 0.0), number)


def select_winner(frame: pd.DataFrame) -> Winner | None:
    """The best trial by :func:`rank`. Only trials that ran all their epochs compete: a pruned
    trial's numbers are from an earlier epoch, a diverged or failed one has none."""
    done = frame[frame["state"] == TrialState.COMPLETE].to_dict("records") if not frame.empty else []
    if not done:
        return None
    best = min(done, key=lambda row: rank(row, row["number"]))
    return Winner(best, best["feasible"] >= 0.5)


def best_so_far(records: list[TrialRecord]) -> TrialRecord | None:
    """The live view's leader by the same rule, over finished trials."""
    done = [r for r in records if r.state == TrialState.COMPLETE and r.report]
    return min(done, key=lambda r: rank(r.report.to_ray(), r.number)) if done else None


def describe_trial(label: str, row: dict) -> str:
    """One line for the terminal (rich markup): a trial's validation numbers and its values."""
    params = " ".join(escape(f"{k[6:]}={_short(v)}") for k, v in row.items()
                      if k.startswith("param.") and not _missing(v))
    test = (f"; test HM {row['test_hm']:.2f} (reported, not selected on)"
            if not _missing(row.get("test_hm")) else "")
    return (f"{label}: trial {int(row['number'])} ({row['state']}) validation HM {row['hm']:.2f} "
            f"(base {row['base_acc']:.2f}, novel {row['novel_acc']:.2f}){test}  {params}")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
