"""Hyperparameter search with Ray Tune + Optuna, every trial logged to MLflow.

    python -m gcs_tune.search --space search_spaces/demo.yaml --gpus 0
    python -m gcs_tune.search --space search_spaces/gcscoop.yaml --gpus 8 data.dataset=dtd data.root=/data
    python -m gcs_tune.search --resume --name NAME [--storage DIR]      # after Ctrl-C

Exit status: 0 done, 2 bad input (a message names the problem), 130 interrupted (state saved).
"""
from __future__ import annotations

import argparse

from gcs_tune.cli import console, guarded, progress_bar
from gcs_tune.config import ConfigError, parse_overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcs_tune.search", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--space", help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--gpus", type=float, help="GPUs the search may use (default: all of the cluster's; 0: CPU trials)")
    p.add_argument("--trials", type=int, help="trial budget (default: the space's)")
    p.add_argument("--address", help="join a running Ray cluster: auto or host:port")
    p.add_argument("--storage", default="searches", help="where studies live: a folder (shared on a cluster) or URI")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<storage>/<name>/mlflow.db)")
    p.add_argument("--name", help="study name (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted study (same --name/--storage)")
    p.add_argument("--quiet", action="store_true", help="no live view; one line per finished trial")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on loopback and print its address "
                   "(needs the dashboard extra: pip install -e '.[dashboard]')")
    p.add_argument("--optuna-storage", default="", metavar="URL",
                   help="the study's Optuna storage, an RDB URL (default: sqlite:///<study>/optuna.db)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="base run config overrides, e.g. data.root=/data")
    return p.parse_intermixed_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    """Run or resume a study. Exit 0 when done, 2 on bad input, 130 when interrupted."""
    args = parse_args(argv)
    if args.gpus is not None and args.gpus < 0:  # before the slow imports below
        raise ConfigError(f"--gpus must be >= 0, got {args.gpus:g}")
    from gcs_tune.tune.runner import SearchOptions, run_search  # late: Ray/MLflow imports are slow

    opts = SearchOptions(space=args.space, gpus=args.gpus, trials=args.trials, address=args.address,
                         storage=args.storage, tracking_uri=args.tracking_uri, name=args.name,
                         resume=args.resume, overrides=parse_overrides(args.overrides), live=not args.quiet,
                         dashboard=args.dashboard, optuna_storage=args.optuna_storage,
                         progress=progress_bar(args.quiet))
    try:
        outcome = run_search(opts)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; what was saved can be finished with --resume --name NAME")
        return 130
    return outcome.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
