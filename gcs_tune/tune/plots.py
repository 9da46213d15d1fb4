"""The project's own plots (matplotlib, PNG): base against novel accuracy with the base floor and
iso-HM curves, per study (logged on the parent MLflow run) and per comparison."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster heads and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gcs_tune.tune.trial import TrialState  # noqa: E402

STATE_COLOURS = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:gray", TrialState.DIVERGED: "tab:red",
                 TrialState.FAILED: "black"}


def make_plots(frame: pd.DataFrame, folder: Path, floor: float | None) -> list[Path]:
    """The project's own study plot, base against novel with the floor, as ``folder/base_vs_novel.png``.

    The optimisation history, parameter importances, contours, learning curves and timeline are
    Optuna's own (``optuna.visualization.matplotlib``), drawn by :mod:`gcs_tune.tune.optuna_study`
    from the study rebuilt out of ``trials.parquet``."""
    done = finished(frame)
    if done.empty:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    return [_base_novel(done, folder, floor)]


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    """The trials that reported numbers (complete, pruned, diverged), by trial number."""
    if frame.empty:
        return frame
    reported = frame["state"].isin([TrialState.COMPLETE, TrialState.PRUNED, TrialState.DIVERGED])
    return frame[reported].sort_values("number")


def _base_novel(done: pd.DataFrame, folder: Path, floor: float | None) -> Path:
    return _save(base_novel_figure(done, floor), folder / "base_vs_novel.png")


def base_novel_figure(done: pd.DataFrame, floor: float | None) -> Figure:
    """Validation base against novel accuracy per trial, coloured by state, with the base floor
    and iso-HM curves: where the floor cuts the trade-off, which Optuna's plots do not show."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for state, rows in done.groupby("state"):
        ax.scatter(rows["base_acc"], rows["novel_acc"], s=18, label=state, c=STATE_COLOURS.get(state, "tab:blue"))
    if floor is not None:
        ax.axvline(floor, ls="--", c="tab:orange", label=f"base floor {floor:.1f}")
    lo = float(np.nanmin([done["base_acc"].min(), done["novel_acc"].min(), 0]))
    grid = np.linspace(max(lo, 1), 100, 50)
    for hm in (20, 40, 60, 80):  # iso-HM curves: novel = hm*b / (2b - hm)
        b = grid[2 * grid > hm]
        ax.plot(b, hm * b / (2 * b - hm), lw=0.5, c="0.8")
    ax.set(xlabel="validation base accuracy (%)", ylabel="validation novel accuracy (%)",
           xlim=(0, 100), ylim=(0, 100), title="base vs novel (grey: iso-HM)")
    ax.legend(fontsize=8)
    return fig


def _iso_hm(ax, levels=(20, 30, 40, 50, 60, 70, 80, 90)) -> None:
    grid = np.linspace(1, 100, 200)
    for hm in levels:  # novel = hm·b / (2b − hm) on the curve of constant harmonic mean
        b = grid[2 * grid > hm + 1e-9]
        n = hm * b / (2 * b - hm)
        keep = n <= 100
        ax.plot(b[keep], n[keep], lw=0.5, c="0.8")
        ax.annotate(f"HM {hm}", (b[keep][-1], n[keep][-1]), fontsize=6, color="0.6")


def comparison_plot(points: list[tuple[str, list[float], list[float]]], zs_base: list[float], zs_novel: list[float],
                    path: Path) -> Path:
    """Test base against novel accuracy, mean ± std over seeds per (space, setting), zero-shot
    marked, iso-HM curves behind."""
    fig, ax = plt.subplots(figsize=(6, 6))
    _iso_hm(ax)
    ax.scatter([np.mean(zs_base)], [np.mean(zs_novel)], marker="*", s=120, c="k", label="zero-shot", zorder=3)
    for label, base, novel in points:
        ax.errorbar(np.mean(base), np.mean(novel), xerr=np.std(base, ddof=1) if len(base) > 1 else 0,
                    yerr=np.std(novel, ddof=1) if len(novel) > 1 else 0, fmt="o" if "tuned" in label else "s",
                    capsize=3, label=label, zorder=3)
    every = [v for _, b, n in points for v in (*b, *n)] + list(zs_base) + list(zs_novel)
    lo, hi = max(0.0, min(every) - 5), min(100.0, max(every) + 5)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="test base accuracy (%)", ylabel="test novel accuracy (%)",
           title="tuned against tuned (mean ± std over seeds; grey: iso-HM)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def png_bytes(fig: Figure, dpi: int = 100, layout: bool = True) -> bytes:
    """The figure as PNG bytes (for pages that embed their images), closed afterwards. ``layout``
    False keeps the figure's own axes layout (Optuna's put their legends outside the axes, which
    tight_layout would squeeze the plot for); the saved box grows to hold them instead."""
    buf = io.BytesIO()
    if layout:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
