"""Pick a study's winner honestly and, with ``--export``, measure it on the test split.

    python -m gcs_tune.best                                   # the latest study under ./searches
    python -m gcs_tune.best --name NAME --storage DIR --export [DIR] --seeds 1,2,3

1. Finalists: the top ``--finalists`` trials by validation objective (feasible first, then HM),
   with the paper defaults' trial always among them, re-run on ``--finalist-seeds`` seeds the
   search never used -- validation only, in the study's selection protocol (``pseudo_novel``: no
   novel class is read). The winner is the best mean; the table says whether its lead over the
   defaults is larger than its noise (the 95 % interval of the paired difference over seeds).
2. ``--export``: ``winner.yaml`` (loadable by ``python -m gcs_tune.train --config``), then the
   winner, the defaults and a CoOp run at the study's recipe, each trained on all base classes on
   every seed of ``--seeds``, measured on the test split, beside zero-shot: ``test.md``,
   ``test.csv``, ``verdict.json``, the prompts, and an MLflow run linked to the study.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gcs_tune.cli import console, guarded
from gcs_tune.config import ConfigError, dump_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcs_tune.best", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--name", help="study name (default: the latest study in --storage)")
    p.add_argument("--storage", default="searches", help="where the study lives (as given to gcs_tune.search)")
    p.add_argument("--finalists", type=int, default=3, help="top trials re-run on extra seeds (0: the single-seed winner)")
    p.add_argument("--finalist-seeds", type=int, default=2, help="extra seeds per finalist (validation only)")
    p.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                   help="write the winner's config and measure it on the test split (default DIR: <study>/export)")
    p.add_argument("--seeds", default="1,2,3", help="seeds of the test measurement, e.g. 1,2,3")
    p.add_argument("--address", help="a Ray cluster to train on (default: a local one)")
    return p.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def export(info, winner, lead, out: Path, seeds: list[int], address: str | None) -> dict:
    """winner.yaml, then the test table of winner / defaults / CoOp / zero-shot over ``seeds``."""
    from gcs_tune.tune import verdict
    from gcs_tune.tune.tracking import Tracker, flatten

    out.mkdir(parents=True, exist_ok=True)
    cfg = verdict.trial_config(info, winner.params).for_protocol()
    dump_config(cfg, out / "winner.yaml")
    results = verdict.measure(info, winner.params, seeds, out, address, say=console.print)
    labels = {"winner": f"winner (trial {winner.number})", "defaults": "paper defaults", "coop": "CoOp (study recipe)"}
    selection = info.base["objective"]["selection"]
    report = verdict.test_report(f"{info.name}: test split, seeds {','.join(map(str, seeds))}, trained on all base "
                                 "classes", selection, results, labels)
    (out / "test.md").write_text(report.text)
    (out / "test.csv").write_text("row,seed,base_acc,novel_acc,hm\n" + "".join(
        f"{r.label},{s},{b},{n},{h}\n" for r in report.rows for s, b, n, h in zip(r.seeds, r.base, r.novel, r.hm)))
    summary = {"selection": selection, "winner_trial": winner.number, "params": winner.params, "seeds": seeds,
               "lead_over_defaults_validation": None if lead is None else [lead.mean, lead.half_width],
               "rows": {r.label: {"base": r.base, "novel": r.novel, "hm": r.hm} for r in report.rows},
               "paired_hm": {k: [d.mean, d.half_width] for k, d in report.diffs.items()}}
    (out / "verdict.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tracker = Tracker.for_study(info)
    run_id = tracker.side_run("export", f"export-trial-{winner.number:03d}", info.name, {"winner_trial": winner.number})
    metrics = {f"test_hm_{k}": verdict.summary([r.hm for r in v]).mean for k, v in results.items()}
    tracker.log_run(run_id, params={**flatten(cfg.to_dict()), "seeds": ",".join(map(str, seeds))}, metrics=metrics)
    tracker.log_files(run_id, [out / n for n in ("winner.yaml", "test.md", "test.csv", "verdict.json")])
    tracker.finish(run_id)
    console.print(report.text, soft_wrap=True)
    console.print(f"exported to {out}: winner.yaml (python -m gcs_tune.train --config {out / 'winner.yaml'}), "
                  f"test.md, verdict.json, <row>/seed*/prompt.pt; MLflow run {run_id}", soft_wrap=True)
    return summary


@guarded
def main(argv: list[str] | None = None) -> int:
    """Finalists, winner, and the test table if asked. Exit 0, or 2 on bad input."""
    args = parse_args(argv)
    from gcs_tune.tune.results import describe_trial, read_table
    from gcs_tune.tune.study import StudyDir, StudyInfo, latest_study, resolve_storage
    from gcs_tune.tune.trial import TrialState

    seeds = parse_seeds(args.seeds)
    if args.finalists < 0 or args.finalist_seeds < 0:
        raise ConfigError("--finalists and --finalist-seeds must be >= 0")
    storage = resolve_storage(args.storage)
    name = args.name or latest_study(storage)
    if not name:
        raise ConfigError(f"no study found in {storage}; pass --storage DIR and --name NAME")
    study = StudyDir(storage, name)
    info = StudyInfo.load(study)
    frame = read_table(study)
    if frame.empty or not (frame["state"] == TrialState.COMPLETE).any():
        raise ConfigError(f"study {name}: no trial has finished all its epochs yet ({len(frame)} trial(s) recorded)")
    selection = info.base["objective"]["selection"]
    console.print(f"study {name}; selection {selection}: " + (
        "validation HM is pseudo-base vs pseudo-novel, both halves of the base classes: no novel class was read"
        if selection == "pseudo_novel" else "validation HM reads the novel classes' validation images"), soft_wrap=True)
    default = frame[frame["is_default"]]
    if not default.empty:
        console.print(describe_trial("defaults (enqueued first)", default.iloc[0].to_dict()), soft_wrap=True)
    from gcs_tune.tune.verdict import select

    chosen = select(study, info, frame, args.finalists, args.finalist_seeds, args.address, say=console.print)
    console.print(chosen.markdown(name), soft_wrap=True)
    if args.export is not None:
        out = Path(args.export).expanduser().resolve() if args.export else study.local / "export"
        export(info, chosen.winner, chosen.lead, out, seeds, args.address)
    from gcs_tune.tune.report import write_report

    console.print(f"report (with the finalists{' and the test table' if args.export is not None else ''}): "
                  f"{write_report(study.local)}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
