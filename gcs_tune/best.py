"""Pick a study's winner by our rule and, with ``--export``, retrain it on several seeds.

    python -m gcs_tune.best                                   # the latest study under ./searches
    python -m gcs_tune.best --name NAME --storage DIR --export [DIR] --seeds 1,2,3

Winner: feasible first (validation base accuracy at or above the floor), then validation HM, ties
by base accuracy; if no trial is feasible, the least violation (and it says so). ``--export``
writes ``winner.yaml`` (loadable by ``python -m gcs_tune.train --config``), retrains it once per
seed with the test split, and writes the base/novel/HM mean ± std table (``seeds.md``,
``seeds.csv``) and the learned prompts; the export is logged to MLflow as a run linked to the study.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from gcs_tune.cli import console, guarded
from gcs_tune.config import ConfigError, RunConfig, build_config, dump_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcs_tune.best", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--name", help="study name (default: the latest study in --storage)")
    p.add_argument("--storage", default="searches", help="where the study lives (as given to gcs_tune.search)")
    p.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                   help="write the winner's config and retrain it on --seeds (default DIR: <study>/export)")
    p.add_argument("--seeds", default="1,2,3", help="seeds to retrain on, e.g. 1,2,3")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def winner_config(info, row: dict) -> RunConfig:
    """The winning trial's run config: the study's base plus its values, test split on."""
    from gcs_tune.tune.results import trial_params

    keys = {name: p["key"] for name, p in info.space["params"].items()}
    overrides = {keys[n]: v for n, v in trial_params(row).items() if n in keys}
    overrides.update({"eval.test": True, "out": None})
    return build_config(info.base, overrides, source=f"{info.name}: winner")


def seed_table(results: list[dict]) -> tuple[str, str, dict[str, float]]:
    """(markdown, csv, summary) of the per-seed test accuracies with mean ± std."""
    cols = ("base_acc", "novel_acc", "hm")
    summary: dict[str, float] = {}
    for c in cols:
        values = [r[c] for r in results if r.get(c) is not None]
        summary[f"{c}_mean"] = statistics.fmean(values) if values else float("nan")
        summary[f"{c}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    md = ["| seed | base | novel | HM |", "|---:|---:|---:|---:|"]
    csv = ["seed,base_acc,novel_acc,hm"]
    for r in results:
        md.append(f"| {r['seed']} | " + " | ".join(_num(r.get(c)) for c in cols) + " |")
        csv.append(f"{r['seed']}," + ",".join(str(r.get(c)) for c in cols))
    md.append("| mean ± std | " + " | ".join(f"{summary[c + '_mean']:.2f} ± {summary[c + '_std']:.2f}" for c in cols) + " |")
    csv.append("mean," + ",".join(f"{summary[c + '_mean']:.4f}" for c in cols))
    csv.append("std," + ",".join(f"{summary[c + '_std']:.4f}" for c in cols))
    return "\n".join(md) + "\n", "\n".join(csv) + "\n", summary


def _num(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def export(info, winner, out: Path, seeds: list[int], quiet: bool) -> Path:
    """Write winner.yaml, retrain per seed, write the seed table, log the export to MLflow."""
    from gcs_tune.train import run
    from gcs_tune.tune.tracking import Tracker, flatten

    out.mkdir(parents=True, exist_ok=True)
    cfg = winner_config(info, winner.row)
    dump_config(cfg, out / "winner.yaml")
    results = []
    for seed in seeds:
        console.print(f"retraining the winner, seed {seed} -> {out / f'seed{seed}'}", soft_wrap=True)
        results.append(run(cfg.replace(seed=seed), out / f"seed{seed}", quiet=quiet))
    md, csv, summary = seed_table(results)
    title = f"# {info.name}: winner (trial {int(winner.row['number'])}) on the test split, {len(seeds)} seed(s)\n\n"
    (out / "seeds.md").write_text(title + md)
    (out / "seeds.csv").write_text(csv)
    tracker = Tracker(info.tracking_uri, info.experiment, parent_id=info.parent_run_id)
    run_id = tracker.side_run("export", f"export-trial-{int(winner.row['number']):03d}", info.name,
                              {"gcs_tune.winner_trial_id": winner.row["trial_id"], "feasible": winner.feasible})
    tracker.log_run(run_id, params={**flatten(cfg.to_dict()), "seeds": ",".join(map(str, seeds))}, metrics=summary)
    tracker.log_files(run_id, [out / "winner.yaml", out / "seeds.md", out / "seeds.csv"])
    for seed in seeds:
        tracker.log_files(run_id, [out / f"seed{seed}" / n for n in ("prompt.pt", "result.json")], f"seed{seed}")
    tracker.finish(run_id)
    console.print(md)
    console.print(f"exported to {out}: winner.yaml (python -m gcs_tune.train --config {out / 'winner.yaml'}), "
                  f"seeds.md, seeds.csv, seed*/prompt.pt; MLflow run {run_id}", soft_wrap=True)
    return out


@guarded
def main(argv: list[str] | None = None) -> int:
    """Print the winner (and the defaults' trial); export it if asked. Exit 0, or 2 on bad input."""
    args = parse_args(argv)
    from gcs_tune.tune.results import describe_trial, read_table, select_winner
    from gcs_tune.tune.study import StudyDir, StudyInfo, latest_study, resolve_storage

    seeds = parse_seeds(args.seeds)
    storage = resolve_storage(args.storage)
    name = args.name or latest_study(storage)
    if not name:
        raise ConfigError(f"no study found in {storage}; pass --storage DIR and --name NAME")
    study = StudyDir(storage, name)
    info = StudyInfo.load(study)
    frame = read_table(study)
    winner = select_winner(frame)
    if winner is None:
        raise ConfigError(f"study {name}: no trial has finished all its epochs yet ({len(frame)} trial(s) recorded)")
    if winner.feasible:
        console.print(describe_trial("winner (feasible, best validation HM)", winner.row), soft_wrap=True)
    else:
        console.print("[bold red]NO TRIAL MET THE BASE FLOOR[/]: the winner is the trial with the least violation "
                      f"({winner.row['violation']:.2f} points of base accuracy below the floor)", soft_wrap=True)
        console.print(describe_trial("least-violation trial", winner.row), soft_wrap=True)
    default = frame[frame["is_default"]]
    if not default.empty:
        console.print(describe_trial("defaults (enqueued first)", default.iloc[0].to_dict()), soft_wrap=True)
    if args.export is not None:
        out = Path(args.export).expanduser().resolve() if args.export else study.local / "export"
        export(info, winner, out, seeds, args.quiet)
    else:
        console.print(json.dumps({k: v for k, v in winner.row.items() if k.startswith("param.")}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
