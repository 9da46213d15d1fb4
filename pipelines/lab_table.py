"""The lab's table: zero-shot / CoOp / SAM-CoOp / GCSCoOp, base / novel / HM on the test split,
mean ± std over seeds, with seconds. Every method uses the same recipe; only the step rule differs.

  python pipelines/lab_table.py                            # 16 shots, 150 epochs, seeds 1,2,3
  python pipelines/lab_table.py --epochs 50 --seeds 1      # a quicker look
  python pipelines/lab_table.py method.rho=0.05            # overrides apply to every method
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from gcs_tune.config import load_config, parse_overrides
from gcs_tune.engine import fit
from gcs_tune.prepare import prepare

console = Console()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="coop,sam_coop,gcscoop")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--out", default="results/lab_table", help="writes OUT.json and OUT.md")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel (one CPU thread each)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def run_all(args) -> dict[str, list[dict]]:
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            per_seed = pool.starmap(run_seed, [(args, seed, 1) for seed in seeds])
    else:
        per_seed = [run_seed(args, seed) for seed in seeds]
    rows: dict[str, list[dict]] = {}
    for seed_rows in per_seed:
        for method, row in seed_rows.items():
            rows.setdefault(method, []).append(row)
    return rows


def run_seed(args, seed: int, threads: int | None = None) -> dict[str, dict]:
    """Zero-shot and every method on one seed; the seed's features are shared by its methods."""
    if threads:
        torch.set_num_threads(threads)
    rows: dict[str, dict] = {}
    base_overrides = {"schedule.epochs": args.epochs, **parse_overrides(args.overrides)}
    prep = None
    for method in args.methods.split(","):
        cfg = load_config(None, {**base_overrides, "seed": seed, "method.name": method})
        prep = prep or prepare(cfg)
        start = time.perf_counter()
        last = None
        for last in fit(cfg, prep):
            pass
        f = last.final
        rows[method] = {"seed": seed, "base": f.test.base, "novel": f.test.novel, "hm": f.test.hm,
                        "seconds": time.perf_counter() - start, **last.diagnostics}
        console.print(f"seed {seed} {method:9s} base {f.test.base:5.1f} novel {f.test.novel:5.1f} "
                      f"HM {f.test.hm:5.1f}  ({rows[method]['seconds']:.0f} s) {last.diagnostics or ''}")
    zs = f.zero_shot_test
    return {"zero-shot": {"seed": seed, "base": zs.base, "novel": zs.novel, "hm": zs.hm, "seconds": 0.0}, **rows}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def summarise(rows: dict[str, list[dict]]) -> list[list[str]]:
    table = []
    for method, runs in rows.items():
        cells = [method] + [mean_std([r[k] for r in runs]) for k in ("base", "novel", "hm")]
        cells.append(f"{statistics.mean(r['seconds'] for r in runs):.0f}")
        cases = [k for k in ("frac_g", "frac_proj", "frac_gs") if k in runs[0]]
        cells.append(" / ".join(f"{100 * statistics.mean(r[k] for r in runs):.0f}%" for k in cases) or "–")
        table.append(cells)
    return table


def main(argv=None) -> int:
    args = parse(argv)
    rows = run_all(args)
    header = ["method", "base", "novel", "HM", "seconds", "last-epoch GCSAM g / proj / g_s"]
    summary = summarise(rows)
    table = Table(title=f"lab, test split, seeds {args.seeds}, {args.epochs} epochs")
    for h in header:
        table.add_column(h, justify="right")
    for cells in summary:
        table.add_row(*cells)
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in summary]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    console.print(f"written {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
