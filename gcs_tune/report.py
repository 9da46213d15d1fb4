"""One HTML page for a study or a comparison, and the study as Optuna storage for optuna-dashboard.

    python -m gcs_tune.report                          # the latest study or comparison under ./searches
    python -m gcs_tune.report --name NAME [--storage DIR] [--out report.html]
    python -m gcs_tune.report --storage searches/NAME  # a study or comparison folder itself

The page (``<folder>/report.html`` unless ``--out``) is self-contained, images embedded: the winner
against the paper defaults and the CoOp reference, the finalists and the test table when
``gcs_tune.best --export`` ran, the top trials, Optuna's plots and the base-against-novel plot; a
comparison adds its table and one section per study. Each study's Optuna storage
(``<study>/optuna.db``, kept by the search while it runs) is brought in step with its table:
``optuna-dashboard sqlite:///<study>/optuna.db`` opens it.
Exit status: 0 written, 2 bad input (no such study or comparison).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from gcs_tune.cli import console, guarded
from gcs_tune.config import ConfigError

MARKERS = ("study.yaml", "compare.yaml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcs_tune.report", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--name", help="study or comparison name (default: the latest in --storage)")
    p.add_argument("--storage", default="searches",
                   help="where studies live (as given to gcs_tune.search), or a study / comparison folder")
    p.add_argument("--out", help="where to write the page (default: <folder>/report.html)")
    return p.parse_args(argv)


def is_report_folder(path: Path) -> bool:
    return any((path / m).is_file() for m in MARKERS)


def find_folder(storage: str, name: str | None) -> Path:
    """The study or comparison folder named by the options; the newest one when no name is given."""
    root = Path(storage).expanduser().resolve()
    if name:
        folder = root / name
        if not is_report_folder(folder):
            raise ConfigError(f"--name {name}: {folder} is neither a study (study.yaml) nor a comparison (compare.yaml)")
        return folder
    if is_report_folder(root):
        return root
    if not root.is_dir():
        raise ConfigError(f"--storage {root}: no such folder")
    found = [p for p in root.iterdir() if p.is_dir() and is_report_folder(p)]
    if not found:
        raise ConfigError(f"--storage {root}: no study or comparison here; pass --storage DIR and --name NAME")
    return max(found, key=lambda p: max((p / m).stat().st_mtime for m in MARKERS if (p / m).is_file()))


@guarded
def main(argv: list[str] | None = None) -> int:
    """Write the page; exit 0, or 2 on bad input."""
    args = parse_args(argv)
    folder = find_folder(args.storage, args.name)
    out = Path(args.out).expanduser().resolve() if args.out else None
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {out}: the page is HTML (a .html path)")
    from gcs_tune.tune.report import dashboard_command, study_folders, write_report  # late: Optuna imports
    from gcs_tune.tune.study import StudyDir, StudyInfo

    page = write_report(folder, out)
    console.print(f"report: {escape(str(page))}  (open file://{escape(str(page))})", soft_wrap=True)
    for study in study_folders(folder):  # optuna-dashboard is not a dependency: say how to get it
        info = StudyInfo.load(StudyDir(str(study.parent), study.name))
        console.print(f"optuna-dashboard: [bold]{escape(dashboard_command(info, study))}[/]  "
                      "(pip install optuna-dashboard)", soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
