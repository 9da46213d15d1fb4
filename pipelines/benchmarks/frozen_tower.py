"""What keeping frozen vision prompts' features saves: one CasPL + CoOp run on the lab, trained
twice in this process from the same seed -- its row as shipped (``images: frozen_tower``: each crop
through the boosted image tower once) and the same row with ``images: tower`` (the tower on every
batch and every evaluation) -- timed, and the two runs' prompts and accuracies compared.

    python pipelines/benchmarks/frozen_tower.py                    # 20 epochs, batch 128
    python pipelines/benchmarks/frozen_tower.py --epochs 5 --json out.json

CasPL's stage 1 (the boosting prompt) runs first if it is not cached yet; it is not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from gcs_tune.config import load_config
from gcs_tune.engine import fit
from gcs_tune.methods import caspl
from gcs_tune.methods.table import METHODS
from gcs_tune.prepare import prepare


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the numbers here")
    return p.parse_args(argv)


def timed_run(cfg, prep, images: str):
    row = METHODS["caspl_coop"]
    METHODS["caspl_coop"] = dataclasses.replace(row, images=images)
    try:
        start = time.perf_counter()
        last = list(fit(cfg, prep))[-1]
        return time.perf_counter() - start, last
    finally:
        METHODS["caspl_coop"] = row


def main(argv=None) -> dict:
    args = parse(argv)
    cfg = load_config(None, {"method.name": "caspl_coop", "schedule.epochs": args.epochs,
                             "optim.batch_size": args.batch, "seed": args.seed})
    prep = prepare(cfg)
    caspl.boost_state(cfg, prep)  # stage 1 trained or read back now, outside both timings
    kept_s, kept = timed_run(cfg, prep, "frozen_tower")
    tower_s, tower = timed_run(cfg, prep, "tower")
    diff = max(float((kept.final.prompt[k] - v).abs().max()) for k, v in tower.final.prompt.items()
               if isinstance(v, torch.Tensor))
    out = {"epochs": args.epochs, "batch": args.batch, "frozen_tower_s": kept_s, "tower_s": tower_s,
           "speedup": tower_s / kept_s, "max_prompt_diff": diff,
           "test_hm": {"frozen_tower": kept.final.test.hm, "tower": tower.final.test.hm}}
    print(f"caspl_coop, {args.epochs} epochs of batch {args.batch} on the lab, {torch.get_num_threads()} threads: "
          f"frozen_tower {kept_s:.1f} s, tower {tower_s:.1f} s ({out['speedup']:.1f}x); "
          f"prompts differ by {diff:.1e} at most; test HM {kept.final.test.hm:.2f} / {tower.final.test.hm:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
