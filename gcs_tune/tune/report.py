"""One self-contained HTML page for a study or a comparison (``report.html``, PNGs embedded).

Each study's Optuna storage (``optuna.db``, or the study's ``--optuna-storage``) is brought in
step with ``trials.parquet`` first (:class:`~gcs_tune.tune.optuna_study.PersistedStudy`: a
``FrozenTrial`` per row with the space's distributions, the base floor as the searcher's
constraint, PRUNED / FAIL from the state column and the per-epoch validation objective as
intermediate values). Optuna's matplotlib plots draw from it; the project's base-against-novel
plot adds the floor and the iso-HM curves."""
from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gcs_tune.config import ConfigError, ObjectiveConfig
from gcs_tune.objective import resolve_floor
from gcs_tune.tune.optuna_study import PersistedStudy, dashboard_command, optuna_figures, storage_url
from gcs_tune.tune.plots import base_novel_figure, finished, png_bytes
from gcs_tune.tune.results import rank, read_table, select_winner, trial_params
from gcs_tune.tune.study import STUDY_FILE, StudyDir, StudyInfo
from gcs_tune.tune.trial import TrialState

REPORT, COMPARE_FILE = "report.html", "compare.yaml"
TOP = 10  # rows of the top-trials table
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td:last-child{text-align:left}tr.winner{background:#e6f4ea}tr.defaults{background:#fff4e0}
tr.reference{background:#e8f0fe}.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:580px}
figure img{max-width:100%;border:1px solid #ddd}figcaption,.note{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:1px 4px}section.study{border-top:2px solid #888;margin-top:2em}"""


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` for the study or comparison in ``folder`` (and bring each study's
    Optuna storage in step with its table); returns the page's path (``out`` when given)."""
    folder = Path(folder)
    if (folder / COMPARE_FILE).is_file():
        title, body = f"comparison {folder.name}", _comparison(folder)
    elif (folder / STUDY_FILE).is_file():
        title, body = f"study {folder.name}", _study(folder, level=1)
    else:
        raise ConfigError(f"{folder}: neither a study ({STUDY_FILE}) nor a comparison ({COMPARE_FILE})")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>gcs_tune: {_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    return _write_atomic(Path(out) if out else folder / REPORT, page.encode())


def study_folders(folder: Path) -> list[Path]:
    """The study folders of a report folder: itself, or a comparison's ``studies/*``."""
    if (folder / COMPARE_FILE).is_file():
        return sorted(p for p in (folder / "studies").glob("*") if (p / STUDY_FILE).is_file())
    return [folder]


# ---------------------------------------------------------------- page parts


def _study(folder: Path, level: int) -> str:
    """A study's section: what was searched, the winner against defaults and reference, the
    finalists and the test table when ``gcs_tune.best`` ran, the top trials and the plots."""
    study = StudyDir(str(folder.parent), folder.name)
    info, frame = StudyInfo.load(study), read_table(study)
    persisted = PersistedStudy(info, storage_url(info, folder))
    try:
        if study.driver_running():  # its driver keeps the storage (the table lags: rows are written at trial ends)
            optuna_study = persisted.study
        else:
            optuna_study = persisted.sync(frame.to_dict("records") if not frame.empty else [])
        figures = optuna_figures(optuna_study, info)
    finally:
        persisted.close()
    floor = _floor(info)
    counts = ", ".join(f"{n} {s}" for s, n in frame["state"].value_counts().items()) if not frame.empty else "none"
    h = f"h{level}"
    parts = [f"<{h}>study {_e(info.name)}</{h}>",
             f"<p>{_e(info.space.get('description') or info.space_path)}<br>created {_e(info.created)}; "
             f"{len(frame)}/{info.trials} trials ({_e(counts)}); selection <b>{_e(info.base['objective']['selection'])}"
             f"</b>; base floor {_num(floor)}; MLflow <code>{_e(info.tracking_uri)}</code>; "
             f"Optuna: <code>{_e(dashboard_command(info, folder))}</code></p>",
             "<h3>winner against the paper defaults and the CoOp reference (validation)</h3>",
             _versus(info, frame, floor)]
    for rel, what in (("finalists.md", "finalists re-run on extra seeds"), ("export/test.md", "test split")):
        if (folder / rel).is_file():
            parts.append(f"<h3>{what} (<code>{rel}</code>)</h3>" + _markdown((folder / rel).read_text()))
    done = finished(frame)
    own = png_bytes(base_novel_figure(done, floor)) if not done.empty else "not drawn: no trial reported yet"
    figures += [("validation base vs novel per trial, base floor dashed, grey iso-HM curves", own)]
    parts += ["<h3>top trials</h3>", _top_trials(frame), "<h3>plots</h3>", _figures(figures)]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in persisted.notes]
    return "\n".join(parts)


def _comparison(folder: Path) -> str:
    state = yaml.safe_load((folder / COMPARE_FILE).read_text()) or {}
    spaces = ", ".join(Path(s).stem for s in state.get("spaces", []))
    parts = [f"<h1>comparison {_e(folder.name)}</h1>",
             f"<p>spaces {_e(spaces)}; trials per study {_e(state.get('trials') or 'each space’s own')}; "
             f"test seeds {_e(state.get('seeds'))}; {_e(state.get('finalists'))} finalists per study on "
             f"{_e(state.get('finalist_seeds'))} extra seeds; created {_e(state.get('created', ''))}</p>"]
    if (folder / "table.md").is_file():
        parts.append(_markdown((folder / "table.md").read_text()))
    else:
        parts.append("<p class='note'>no table yet: the comparison has not finished</p>")
    if (folder / "base_vs_novel.png").is_file():
        parts.append(_figures([("test base vs novel, tuned against tuned", (folder / "base_vs_novel.png").read_bytes())]))
    for study in study_folders(folder):
        parts.append(f"<section class='study'>{_study(study, level=2)}</section>")
    return "\n".join(parts)


def _versus(info: StudyInfo, frame: pd.DataFrame, floor: float | None) -> str:
    header = ["", "trial", "state", "objective", "HM", "base", "novel", "feasible", "values"]
    rows, classes = [], []
    winner = select_winner(frame) if not frame.empty else None
    if winner is not None:
        label = "winner (best feasible)" if winner.feasible else "winner: NONE FEASIBLE, least violation"
        rows.append(_trial_cells(label, winner.row)), classes.append("winner")
    default = frame[frame["is_default"]] if not frame.empty else frame
    if not default.empty:
        rows.append(_trial_cells("paper defaults", default.iloc[0].to_dict())), classes.append("defaults")
    ref = info.reference
    if ref:
        rows.append(["CoOp reference", "–", "diverged" if ref.get("diverged") else "complete", "–", _num(ref["hm"]),
                     _num(ref["base_acc"]), _num(ref["novel_acc"]), "sets the floor", f"{ref.get('epochs')} epochs"])
        classes.append("reference")
    if not rows:
        return "<p class='note'>no trial has finished yet</p>"
    return _table(header, rows, classes) + f"<p class='note'>base floor: {_num(floor)}</p>"


def _top_trials(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='note'>no trials recorded</p>"
    rows = frame.to_dict("records")
    done = sorted((r for r in rows if r["state"] == TrialState.COMPLETE), key=lambda r: rank(r, r["number"]))
    rest = sorted((r for r in rows if r["state"] != TrialState.COMPLETE),
                  key=lambda r: -r["objective"] if _finite(r["objective"]) else math.inf)
    top = (done + rest)[:TOP]
    header = ["trial", "state", "objective", "HM", "base", "novel", "violation", "epochs", "seconds", "values"]
    cells = [[str(int(r["number"])) + (" (defaults)" if r.get("is_default") else ""), r["state"]]
             + [_num(r.get(k)) for k in ("objective", "hm", "base_acc", "novel_acc", "violation")]
             + [f"{int(r['epoch'])}/{int(r['epochs'])}", _num(r.get("duration_s"), 1), _values(trial_params(r))]
             for r in top]
    return _table(header, cells) + f"<p class='note'>{len(top)} of {len(rows)} trials: complete ones by the " \
                                    "winner rule (feasible first, then HM), then the others by objective</p>"


def _trial_cells(label: str, row: dict[str, Any]) -> list[str]:
    return [label, str(int(row["number"])), row["state"], _num(row["objective"]), _num(row["hm"]),
            _num(row["base_acc"]), _num(row["novel_acc"]), "yes" if row["feasible"] >= 0.5 else "no",
            _values(trial_params(row))]


def _figures(figures: list[tuple[str, bytes | str]]) -> str:
    out = []
    for caption, png in figures:
        body = (f"<img alt='{_e(caption)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                if isinstance(png, bytes) else f"<p class='note'>{_e(png)}</p>")
        out.append(f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>")
    return f"<div class='plots'>{''.join(out)}</div>"


def _markdown(text: str) -> str:
    """The Markdown the CLIs write (headings, tables, bullets, lines) as HTML."""
    out, table, items = [], [], []
    for line in text.splitlines() + [""]:
        s = line.strip()
        if table and not s.startswith("|"):
            out.append(_table(table[0], table[1:])), table.clear()
        if items and not s.startswith("- "):
            out.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"), items.clear()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| rule
                table.append(cells)
        elif s.startswith("- "):
            items.append(s[2:])
        elif s.startswith("#"):
            out.append(f"<h4>{_e(s.lstrip('#').strip())}</h4>")
        elif s:
            out.append(f"<p>{_e(s)}</p>")
    return "\n".join(out)


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(f"<tr class='{(classes or [''] * len(rows))[i]}'>" + "".join(f"<td>{_e(c)}</td>" for c in row)
                   + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------- small helpers


def _floor(info: StudyInfo) -> float | None:
    """The study's base floor when it is one number (a zero-shot floor is resolved per trial)."""
    obj = info.base["objective"]
    if obj["floor"] == "zero_shot" or obj.get("value") is None:
        return None
    return resolve_floor(ObjectiveConfig.model_validate(obj), None)


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "–"


def _values(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)
