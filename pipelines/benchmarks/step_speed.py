"""Where the speed comes from, measured as ratios in one run on one model and one batch.

Modes (each in its own child process, so peak memory is per mode; same seed, model and data):
  reference   what CoOp's reference code does each step: the frozen image encoder on the batch
              and the text transformer over all 77 tokens
  full77      cached image features, text over all 77 tokens (isolates the truncation gain)
  coop        cached image features, text cut at the longest EOS (gcs_tune's CoOp step)
  gcscoop     as coop, with GCSAM's two forward/backward passes

  python pipelines/benchmarks/step_speed.py                    # ViT-B-16, random weights
  python pipelines/benchmarks/step_speed.py --model lab --steps 20
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

MODES = ("reference", "full77", "coop", "gcscoop")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name, or 'lab'")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def setup(args):
    from gcs_tune.config import BackboneConfig
    from gcs_tune.model.backbone import load_backbone
    from gcs_tune.model.prompters import CoOpPrompter, build_bank
    from gcs_tune.model.text import PromptedTextEncoder

    torch.manual_seed(0)
    bb = load_backbone(BackboneConfig(model=args.model, pretrained="lab" if args.model == "lab" else None,
                                      device=args.device))
    encoder = PromptedTextEncoder(bb.model)
    names = [f"class number {i} of the benchmark" for i in range(args.classes)]
    bank = build_bank(encoder, bb.tokenizer, names, list(range(args.classes)), n_ctx=4)
    prompter = CoOpPrompter(encoder, bb.tokenizer, 4, "a photo of a", args.classes)
    images = torch.randn(args.batch, 3, bb.image_size, bb.image_size, device=bb.device)
    targets = torch.randint(args.classes, (args.batch,), device=bb.device)
    return bb, encoder, bank, prompter, images, targets


def full_length_features(encoder, bank, prompter) -> torch.Tensor:
    """The reference text path: the prompt padded to all 77 positions, transformer over all."""
    x = torch.cat([bank.prefix, prompter.context_for(bank.labels), bank.suffix], dim=1)  # (n, L, w)
    pad = encoder.positional_embedding.shape[0] - x.shape[1]
    x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1)  # (n, 77, width)
    x = encoder.transformer(x + encoder.positional_embedding, attn_mask=encoder.attn_mask)
    x = encoder.ln_final(x)[torch.arange(x.shape[0]), bank.eos]
    return x @ encoder.text_projection


def run_mode(args) -> dict:
    from gcs_tune.methods.losses import LOSS_TERMS, LossInputs
    from gcs_tune.methods.steps import GCSAMStep, SGDStep

    bb, encoder, bank, prompter, images, targets = setup(args)
    cuda = bb.device.type == "cuda"
    autocast = torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=cuda)
    with torch.no_grad(), autocast:
        cached = bb.encode_images(images).float()  # what the feature cache would hand the loop
    opt = torch.optim.SGD(prompter.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    params = list(prompter.parameters())
    rule = GCSAMStep(params, opt, 0.1, 0.5, 0.8) if args.mode == "gcscoop" else SGDStep(params, opt)
    scale = bb.model.logit_scale.exp().detach()

    def closure():
        with autocast:
            if args.mode == "reference":
                with torch.no_grad():
                    feats = bb.encode_images(images)
                text = full_length_features(encoder, bank, prompter)
            else:
                feats = cached
                text = (full_length_features(encoder, bank, prompter) if args.mode == "full77"
                        else prompter.text_features(encoder, bank))
            loss = LOSS_TERMS["ce"](LossInputs(feats, targets, text, text, scale))
        loss.backward()
        return loss.detach()

    for _ in range(args.warmup):
        rule.step(closure)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        rule.step(closure)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    return {"mode": args.mode, "step_s": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)", "text_tokens": int(bank.eos.max()) + 1}


def main(argv=None) -> int:
    args = parse(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    rows = []
    for mode in MODES:
        child = [sys.executable, __file__, "--mode", mode, *[a for a in (argv or sys.argv[1:])]]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{mode:10s} {r['step_s'] * 1000:10.1f} ms/step   peak RSS {r['peak_rss_mb']:7.0f} MB"
              + (f"   peak GPU {r['peak_gpu_mb']:7.0f} MB" if r["peak_gpu_mb"] is not None else ""), flush=True)
    t = {r["mode"]: r["step_s"] for r in rows}
    ratios = {"gcscoop_over_coop": t["gcscoop"] / t["coop"], "reference_over_coop": t["reference"] / t["coop"],
              "full77_over_coop": t["full77"] / t["coop"], "reference_over_full77": t["reference"] / t["full77"]}
    print(f"device: {rows[0]['device']}; model {args.model}, {args.classes} classes, batch {args.batch}, "
          f"text cut at {rows[0]['text_tokens']} of 77 tokens, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"GCSCoOp step / CoOp step            = {ratios['gcscoop_over_coop']:.2f}  (target <= 2.1)")
    print(f"reference step / cached+cut CoOp    = {ratios['reference_over_coop']:.1f}x (target >= 8)")
    print(f"  of which: feature cache           = {ratios['reference_over_full77']:.1f}x, "
          f"text cut at EOS = {ratios['full77_over_coop']:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "ratios": ratios}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
