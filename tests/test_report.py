"""The study report on a real small study: a 4-trial search on the lab (real Ray, Optuna, MLflow),
``gcs_tune.best --export`` on one seed, then ``gcs_tune.report``. The page is parsed with the
standard library's html.parser: every plot is an embedded PNG, the winner / defaults / reference
rows and the finalists and test tables are there; ``optuna.load_study`` on ``optuna.db`` gives back
the trials with their states, values, constraints and learning curves. The state mapping (pruned,
failed, infeasible) and the comparison page run on copies of the same study's files."""
from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402

from gcs_tune import best, report, search  # noqa: E402
from gcs_tune.tune.plots import comparison_plot  # noqa: E402
from gcs_tune.tune.report import write_report  # noqa: E402
from gcs_tune.tune.study import StudyDir, StudyInfo  # noqa: E402

NAME = "rep"
OPTUNA_PLOTS = ("optimisation history", "parameter importances", "ρ × β1 contour", "learning curves", "timeline")


class Page(HTMLParser):
    """What a reader sees: images (alt, decoded bytes), captions, table rows, headings."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[tuple[str, bytes]] = []
        self.captions, self.rows, self.headings = [], [], []
        self._text, self._cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            src = a.get("src", "")
            assert src.startswith("data:image/png;base64,"), src[:40]  # embedded, nothing fetched
            self.images.append((a.get("alt", ""), base64.b64decode(src.split(",", 1)[1])))
        elif tag in ("figcaption", "h1", "h2", "h3", "h4"):
            self._text = [tag, ""]
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._text is not None:
            self._text[1] += data
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if self._text is not None and tag == self._text[0]:
            (self.captions if tag == "figcaption" else self.headings).append(self._text[1])
            self._text = None
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def first_cells(self) -> list[str]:
        return [r[0] for r in self.rows if r]


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory, fast_space):
    tmp = tmp_path_factory.mktemp("report")
    params = {"rho": {"key": "method.rho", "type": "loguniform", "low": 0.01, "high": 1.0},
              "beta1": {"key": "method.beta1", "type": "uniform", "low": 0.0, "high": 0.8},
              "lr": {"key": "optim.lr", "type": "loguniform", "low": 1e-3, "high": 1e-2}}
    space = fast_space(tmp, params=params, defaults={"rho": 0.1, "beta1": 0.5, "lr": 0.002})
    storage = tmp / "s"
    assert search.main(["--space", str(space), "--gpus", "0", "--storage", str(storage), "--name", NAME,
                        "--quiet"]) == 0
    folder = storage / NAME
    shutil.copy(folder / "report.html", tmp / "from_search.html")  # what finish_study wrote
    assert best.main(["--storage", str(storage), "--name", NAME, "--finalists", "0", "--export",
                      "--seeds", "1"]) == 0
    assert report.main(["--storage", str(storage), "--name", NAME]) == 0
    return folder


def page_of(path: Path) -> Page:
    return Page(path.read_text())


def test_every_search_ends_with_its_report_logged_on_the_parent_run(study):
    first = page_of(study.parent.parent / "from_search.html")
    assert any(c.startswith("optimisation history") for c in first.captions)
    info = StudyInfo.load(_dir(study))
    names = {a.path for a in MlflowClient(info.tracking_uri).list_artifacts(info.parent_run_id)}
    assert "report.html" in names


def test_every_plot_is_an_embedded_png(study):
    page = page_of(study / "report.html")
    for name in OPTUNA_PLOTS + ("validation base vs novel",):
        assert any(c.startswith(name) for c in page.captions), (name, page.captions)
    assert len(page.images) == len(OPTUNA_PLOTS) + 1
    for alt, png in page.images:
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, alt  # a drawn figure, not an empty frame


def test_winner_defaults_reference_finalists_and_test_rows(study):
    page, frame = page_of(study / "report.html"), pd.read_parquet(study / "trials.parquet")
    cells = page.first_cells()
    assert "winner (best feasible)" in cells or "winner: NONE FEASIBLE, least violation" in cells
    assert {"paper defaults", "CoOp reference"} <= set(cells)
    winner = json.loads((study / "export" / "verdict.json").read_text())["winner_trial"]
    assert {f"winner (trial {winner})", "paper defaults", "CoOp (study recipe)", "zero-shot"} <= set(cells)  # test.md
    assert any(c.startswith(f"{winner}") for c in cells)  # finalists.md
    top = [r for r in page.rows if r and r[0].split(" ")[0].isdigit() and len(r) == 10]
    assert len(top) == len(frame) and {r[1] for r in top} == set(frame["state"])


def test_optuna_db_holds_the_trials_with_their_states(study):
    frame = pd.read_parquet(study / "trials.parquet").sort_values("number")
    loaded = optuna.load_study(study_name=NAME, storage=f"sqlite:///{study / 'optuna.db'}")
    trials = loaded.get_trials()
    assert [t.number for t in trials] == frame["number"].tolist()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t, row in zip(trials, frame.to_dict("records")):
        assert t.value == pytest.approx(row["objective"])
        assert t.constraints == {"base_floor": pytest.approx(row["violation"])}
        assert t.intermediate_values == {int(k): pytest.approx(v) for k, v in json.loads(row["curve_json"]).items()}
        assert t.params == json.loads(row["params_json"])
    assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE


def test_states_and_infeasible_trials_from_the_table(study, tmp_path):
    copy = _copy_study(study, tmp_path / NAME)
    frame = pd.read_parquet(copy / "trials.parquet").sort_values("number").reset_index(drop=True)
    frame.loc[1, "state"] = "pruned"
    frame.loc[2, ["state", "objective"]] = ["failed", float("nan")]
    frame.loc[3, ["violation", "feasible", "objective"]] = [2.5, 0.0, -3.0]
    running = frame.iloc[[3]].assign(number=4, trial_id="still-running", state="running", ended_at=float("nan"))
    pd.concat([frame, running]).to_parquet(copy / "trials.parquet", index=False)  # an interrupted study
    page = page_of(write_report(copy))
    states = [t.state.name for t in optuna.load_study(study_name=NAME, storage=f"sqlite:///{copy / 'optuna.db'}")
              .get_trials()]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "RUNNING"]
    last = optuna.load_study(study_name=NAME, storage=f"sqlite:///{copy / 'optuna.db'}").trials[3]
    assert last.constraints == {"base_floor": 2.5} and last.value == -3.0
    assert len(page.images) == len(OPTUNA_PLOTS) + 1  # history with an infeasible trial still drawn


def test_a_report_of_a_running_study_leaves_its_optuna_storage_to_the_driver(study, tmp_path):
    """A report while the search runs reads the storage the driver keeps and never rewrites it
    from the table, which holds only the trials that ended."""
    copy = _copy_study(study, tmp_path / NAME)
    shutil.copy(study / "optuna.db", copy / "optuna.db")
    pd.read_parquet(copy / "trials.parquet").iloc[:1].to_parquet(copy / "trials.parquet", index=False)
    storage = f"sqlite:///{copy / 'optuna.db'}"
    with StudyDir(str(copy.parent), NAME).lock():
        write_report(copy)
        assert len(optuna.load_study(study_name=NAME, storage=storage).trials) == 4
    write_report(copy)  # no driver: the table is the truth
    assert len(optuna.load_study(study_name=NAME, storage=storage).trials) == 1


def test_comparison_page_has_its_table_and_every_study(study, tmp_path):
    folder = tmp_path / "cmp"
    _copy_study(study, folder / "studies" / NAME)
    (folder / "compare.yaml").write_text(yaml.safe_dump({"spaces": [f"/x/{NAME}.yaml"], "trials": 4, "seeds": [1],
                                                         "finalists": 0, "finalist_seeds": 0, "run_id": ""}))
    (folder / "table.md").write_text("# cmp: test split\n\n| space (method) | setting | HM |\n|---|---|---|\n"
                                      f"| {NAME} (gcscoop) | tuned | 60.0 ± 0.0 |\n")
    comparison_plot([(f"{NAME} tuned", [61.0], [59.0])], [60.0], [58.0], folder / "base_vs_novel.png")
    assert report.main(["--storage", str(folder)]) == 0
    page = page_of(folder / "report.html")
    assert f"{NAME} (gcscoop)" in page.first_cells()
    assert any(c.startswith("test base vs novel") for c in page.captions)
    assert len(page.images) == 1 + len(OPTUNA_PLOTS) + 1
    assert (folder / "studies" / NAME / "optuna.db").is_file()


def test_bad_folders_exit_2_naming_them(tmp_path, capsys):
    assert report.main(["--storage", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert report.main(["--storage", str(tmp_path), "--name", "missing"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.html"))


def _dir(folder: Path):
    from gcs_tune.tune.study import StudyDir

    return StudyDir(str(folder.parent), folder.name)


def _copy_study(src: Path, dst: Path) -> Path:
    """The files a report reads (not Ray's trial folders); study.yaml's storage points at the copy."""
    dst.mkdir(parents=True)
    for name in ("study.yaml", "trials.parquet", "finalists.md"):
        shutil.copy(src / name, dst / name)
    return dst
