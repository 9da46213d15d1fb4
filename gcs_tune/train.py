"""One training run, no Ray: ``python -m gcs_tune.train [--config CFG.yaml] [key=value ...]``.

With no config it trains GCSCoOp on the embedded lab (a short default). Writes into ``--out``:
``result.json`` (test-split accuracies, percent), ``prompt.pt`` (the learned context, a plain
``torch.load``-able dict) and ``config.yaml`` (the resolved config, loadable with ``--config``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gcs_tune.cli import console, guarded, progress_bar
from gcs_tune.config import ConfigError, dump_config, load_config, parse_overrides, RunConfig
from gcs_tune.engine import EpochResult, fit
from gcs_tune.prepare import prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcs_tune.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run config YAML (default: the embedded lab)")
    p.add_argument("--method", help="shorthand for method.name (coop, sam_coop, gcscoop, kgcoop)")
    p.add_argument("--model", help="shorthand for backbone.model (lab, or an open_clip name: ViT-B-16)")
    p.add_argument("--epochs", type=int, help="shorthand for schedule.epochs")
    p.add_argument("--seed", type=int, help="shorthand for seed")
    p.add_argument("--out", help="output folder (default: runs/<method>-seed<seed>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method.rho=0.2")
    return p.parse_intermixed_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = parse_overrides(args.overrides)
    shorthands = (("method", "method.name"), ("model", "backbone.model"), ("epochs", "schedule.epochs"),
                  ("seed", "seed"), ("out", "out"))
    for flag, key in shorthands:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return load_config(args.config, overrides)


def result_dict(cfg: RunConfig, last: EpochResult, seconds: float) -> dict:
    final = last.final
    nan_free = lambda x: round(x, 3) if x is not None and math.isfinite(x) else None  # noqa: E731
    test = final.test if final else None
    return {
        "method": cfg.method.name, "seed": cfg.seed, "epochs": last.epoch,
        "base_acc": nan_free(test.base) if test else None, "novel_acc": nan_free(test.novel) if test else None,
        "hm": nan_free(test.hm) if test else None,
        "objective": nan_free(last.objective), "feasible": last.feasible, "floor": nan_free(last.floor),
        "diverged": last.diverged,
        "zero_shot_base_acc": nan_free(final.zero_shot_test.base) if final else None,
        "zero_shot_novel_acc": nan_free(final.zero_shot_test.novel) if final else None,
        "val_base_acc": nan_free(last.val.base), "val_novel_acc": nan_free(last.val.novel),
        "val_hm": nan_free(last.val.hm), "diagnostics": last.diagnostics, "seconds": round(seconds, 2),
    }


def run(cfg: RunConfig, out_dir: Path, quiet: bool = False) -> dict:
    """Train ``cfg`` and write result.json, prompt.pt and config.yaml into ``out_dir``.

    The files are written into a temporary folder and moved into place together, so an
    interrupted run leaves no half-written result behind."""
    start = time.perf_counter()
    prep = prepare(cfg, progress_bar(quiet))
    last = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task(f"training {cfg.method.name}", total=cfg.schedule.epochs, info="")
        for last in fit(cfg, prep):
            bar.update(task, completed=last.epoch, info=f"loss {last.train_loss:.3f}  val HM {last.val.hm:.1f}")
    result = result_dict(cfg, last, time.perf_counter() - start)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    (staging / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    dump_config(cfg, staging / "config.yaml")
    if last.final is not None:
        torch.save(last.final.prompt, staging / "prompt.pt")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    if not quiet:
        print_table(result, out_dir)
    return result


def print_table(result: dict, out_dir: Path) -> None:
    table = Table(title=f"{result['method']} on the test split (seed {result['seed']}, {result['epochs']} epochs)")
    for col in ("", "base", "novel", "HM"):
        table.add_column(col, justify="right")
    fmt = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    zs_b, zs_n = result["zero_shot_base_acc"], result["zero_shot_novel_acc"]
    zs_hm = None if zs_b is None else (2 * zs_b * zs_n / (zs_b + zs_n) if zs_b + zs_n else 0.0)
    table.add_row("zero-shot", fmt(zs_b), fmt(zs_n), fmt(zs_hm))
    table.add_row(result["method"], fmt(result["base_acc"]), fmt(result["novel_acc"]), fmt(result["hm"]))
    console.print(table)
    feas = "feasible" if result["feasible"] else "below the base floor"
    console.print(f"validation HM {fmt(result['val_hm'])} ({feas}); {result['seconds']:.1f} s; written to {out_dir}")


@guarded
def main(argv: list[str] | None = None) -> int:
    """Train one config; exit 0 on success, 2 on bad input."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    out = Path(cfg.out or f"runs/{cfg.method.name}-seed{cfg.seed}").expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    run(cfg, out, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
