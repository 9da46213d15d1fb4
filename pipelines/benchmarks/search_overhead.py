"""The search's own cost: wall time of a K-trial lab search with 2 concurrent CPU trials against
the trials' own time / 2, and the peak memory of the driver and of Ray.

    python pipelines/benchmarks/search_overhead.py                  # 12 trials, 8 epochs, FIFO
    python pipelines/benchmarks/search_overhead.py --trials 16 --epochs 12 --json out.json

Measured: ``search`` = Tuner.fit wall time (Ray already up, features cached, no reference run);
``ideal`` = sum over trials of their own time (trainable start to last report, i.e. reading the
feature cache, training and evaluating) / 2; overhead = search / ideal - 1 (target < 15%). The
pure training time (sum of epoch times) is printed too. Memory: peak RSS of the driver process
and peak summed RSS of every Ray process (GCS, raylet, workers), sampled every 0.2 s from /proc.
``first_trial_start_delay_s`` is the fixed start-up cost (trial worker processes import torch and
open_clip, then read the cache); ``steady_state_overhead`` is the span from the first trial's
start to the last one's end against ``ideal`` (scheduling gaps and the final tail).
Run it on a quiet machine: other jobs on the 2 cores show up as overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--concurrent", type=int, default=2, help="CPU trials at once (1 CPU each)")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    p.add_argument("--json", help="also write the numbers here")
    return p.parse_args(argv)


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class MemorySampler(threading.Thread):
    """Peak summed RSS of the driver's descendants (Ray's processes), every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_ray_kb, self.stop = 0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.wait(0.2):
            self.peak_ray_kb = max(self.peak_ray_kb, sum(_rss_kb(p) for p in _descendants(me)))


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    import ray

    from gcs_tune.tune.results import read_table
    from gcs_tune.tune.runner import SearchOptions, run_search

    tmp = Path(tempfile.mkdtemp(prefix="gcs_overhead_"))
    sampler = MemorySampler()
    sampler.start()
    ray.init(num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))
    ray_up = time.perf_counter() - t0
    overrides = {"schedule.epochs": args.epochs, "objective.floor": "zero_shot", "objective.tolerance": 5.0}
    space_file = _fifo_space(Path(args.space), tmp, args.trials)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    outcome = run_search(SearchOptions(space=str(space_file), gpus=0, storage=str(tmp / "s"), name="overhead",
                                       live=False, overrides=overrides))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    total = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    frame = read_table(outcome.study)
    own = float((frame["ended_at"] - frame["started_at"]).sum())
    train = float(frame["train_seconds"].sum())
    ideal = own / args.concurrent
    numbers = {
        "trials": len(frame), "epochs": args.epochs, "concurrent": args.concurrent,
        "search_wall_s": round(outcome.seconds, 2), "ideal_s (sum own / concurrent)": round(ideal, 2),
        "overhead": round(outcome.seconds / ideal - 1, 3),
        "sum_train_s / concurrent": round(train / args.concurrent, 2),
        "overhead_vs_pure_training": round(outcome.seconds / (train / args.concurrent) - 1, 3),
        "first_trial_start_delay_s": round(float(frame["started_at"].min()) - outcome.started_at, 2),
        "steady_state_overhead": round((frame["ended_at"].max() - frame["started_at"].min()) / ideal - 1, 3),
        "whole_command_s": round(total, 2), "ray_start_s": round(ray_up, 2),
        "driver_cpu_s": round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 2),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ray_peak_rss_mb": round(sampler.peak_ray_kb / 1024, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    ray.shutdown()
    width = max(map(len, numbers))
    for k, v in numbers.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


def _fifo_space(path: Path, tmp: Path, trials: int) -> Path:
    """The space with FIFO scheduling (every trial runs all its epochs) and the trial budget."""
    import yaml

    tree = yaml.safe_load(path.read_text())
    tree.update(scheduler={"type": "fifo"}, trials=trials)
    tree.setdefault("resources", {})["cpus_per_trial"] = 1
    out = tmp / "space.yaml"
    out.write_text(yaml.safe_dump(tree, sort_keys=False))
    return out


if __name__ == "__main__":
    sys.exit(main())
