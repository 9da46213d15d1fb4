"""Tuned against tuned: one study per search space under the same budget, winners chosen from
finalists, every winner and every method's paper defaults retrained on the protocol and measured
on the test split over seeds, one table.

    python -m gcs_tune.compare --spaces search_spaces/coop.yaml search_spaces/gcscoop.yaml \\
        [--trials N] [--seeds 1,2,3] [--gpus N] [--name NAME] [key=value ...]
    python -m gcs_tune.compare --resume --name NAME          # after Ctrl-C or a crash

``--trials`` and key=value apply to every space. Everything lives in ``<storage>/<NAME>/``: the
studies (``studies/<space>/``), the retrained runs (``final/``), ``table.md``, ``table.parquet``,
``base_vs_novel.png`` and one MLflow store whose comparison run is the parent of every study's run.
Exit status: 0 done, 2 bad input, 130 interrupted (resume with --resume --name NAME).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from gcs_tune.cli import console, guarded, progress_bar
from gcs_tune.config import ConfigError, parse_overrides

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcs_tune.compare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--spaces", nargs="+", help="search space YAMLs, one study each")
    p.add_argument("--trials", type=int, help="trial budget of every study (default: each space's)")
    p.add_argument("--seeds", default="1,2,3", help="seeds of the test measurement")
    p.add_argument("--gpus", type=float, help="GPUs the studies may use (0: CPU trials)")
    p.add_argument("--name", help="comparison name (default: compare-<date>-<time>)")
    p.add_argument("--storage", default="searches", help="where the comparison lives")
    p.add_argument("--finalists", type=int, default=3, help="top trials of each study re-run on extra seeds")
    p.add_argument("--finalist-seeds", type=int, default=2, help="extra seeds per finalist (validation only)")
    p.add_argument("--address", help="join a running Ray cluster: auto or host:port")
    p.add_argument("--resume", action="store_true", help="finish an interrupted comparison (same --name/--storage)")
    p.add_argument("--quiet", action="store_true", help="no live view")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides for every space")
    return p.parse_intermixed_args(argv)


def new_state(args: argparse.Namespace, folder: Path):
    """A new comparison's settings from the command line, every space checked before anything runs."""
    from gcs_tune.best import parse_seeds
    from gcs_tune.tune.comparison import ComparisonState
    from gcs_tune.tune.validate import load_space

    if not args.spaces:
        raise ConfigError("--spaces FILE [FILE ...] is required (or --resume --name NAME)")
    if ComparisonState.exists(folder):
        raise ConfigError(f"comparison {folder.name!r} exists: --resume --name {folder.name}, or another --name")
    overrides = parse_overrides(args.overrides)
    spaces = [str(Path(s).expanduser().resolve()) for s in args.spaces]
    stems = [Path(s).stem for s in spaces]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"--spaces: two spaces share a name ({', '.join(stems)}): each names its study")
    for space in spaces:
        load_space(space, overrides, args.trials)
    return ComparisonState(spaces=spaces, trials=args.trials, seeds=parse_seeds(args.seeds), gpus=args.gpus,
                           overrides=overrides, finalists=args.finalists, finalist_seeds=args.finalist_seeds)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a comparison. Exit 0 when done, 2 on bad input, 130 when interrupted."""
    args = parse_args(argv)
    if args.gpus is not None and args.gpus < 0:
        raise ConfigError(f"--gpus must be >= 0, got {args.gpus:g}")
    from gcs_tune.tune.comparison import Comparison, ComparisonState  # late: Ray and MLflow imports are slow
    from gcs_tune.tune.study import resolve_storage

    name = args.name or (None if args.resume else f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if not name:
        raise ConfigError("--resume needs --name NAME")
    folder = Path(resolve_storage(args.storage)) / name
    state = ComparisonState.load(folder) if args.resume else new_state(args, folder)
    state.save(folder)
    try:
        Comparison(folder, state, args.address, live=not args.quiet, progress=progress_bar(args.quiet)).run()
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]; finish with: python -m gcs_tune.compare --resume --name {name} "
                      f"--storage {args.storage}")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
