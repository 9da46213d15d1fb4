"""Where the speed comes from, measured as ratios in one run on one model and one batch.

Three child processes (same seed, model and data), so peak memory is per process:
  reference   what CoOp's reference code does each step: the frozen image encoder on the batch
              and the text transformer over all 77 tokens
  full77      cached image features, text over all 77 tokens (isolates the truncation gain)
  cached      cached image features, text cut at the longest EOS: gcs_tune's CoOp step and its
              GCSCoOp step (GCSAM's two forward/backward passes), timed alternately; on a GPU also
              GCSCoOp with its gradients under autocast (method.grad_precision=autocast), since the
              default keeps the SAM family's two gradients in fp32
  tower       PromptSRC's step, which cannot use the cache: the image tower runs forward and
              backward with its deep vision prompts on the batch, the text tower with its deep text
              prompts, the frozen features of its losses read from the cache (the same batch size as
              the others, not its recipe's 4). A process of its own: interleaved with the cached
              steps, its large activations evict their working set and slow them by ~20 %
Each time is the median over the timed steps.

  python pipelines/benchmarks/step_speed.py                    # ViT-B-16, random weights
  python pipelines/benchmarks/step_speed.py --model lab --steps 20
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

GROUPS = {"reference": ("reference",), "full77": ("full77",), "cached": ("coop", "gcscoop", "gcscoop_autocast"),
          "tower": ("promptsrc",)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name, or 'lab'")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per rule")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--groups", default=",".join(GROUPS), help="which child processes to run")
    p.add_argument("--group", choices=GROUPS, help=argparse.SUPPRESS)  # set in a child process
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


def make_losses(args, bb, encoder, bank, prompter, images, targets, autocast):
    """name -> function computing that rule's loss on the batch (what its closure differentiates)."""
    from gcs_tune.methods.losses import LOSS_TERMS, LossInputs
    from gcs_tune.methods.table import METHODS
    from gcs_tune.model.deep import PromptedImageEncoder
    from gcs_tune.model.deep_prompters import DeepPrompter

    with torch.no_grad(), autocast:
        cached = bb.encode_images(images).float()  # what the feature cache would hand the loop
        frozen_text = prompter.text_features(encoder, bank).float()  # PromptSRC's frozen text target
    scale = bb.model.logit_scale.exp().detach()
    image_encoder = PromptedImageEncoder(bb.model)
    deep = DeepPrompter(encoder, image_encoder, bb.tokenizer, 4, "a photo of a", 4, depth=9,
                        generator=torch.Generator().manual_seed(0))

    def coop():
        if args.group == "reference":
            with torch.no_grad():
                feats = bb.encode_images(images)
            text = full_length_features(encoder, bank, prompter)
        else:
            feats = cached
            text = (full_length_features(encoder, bank, prompter) if args.group == "full77"
                    else prompter.text_features(encoder, bank))
        return LOSS_TERMS["ce"](LossInputs(feats, targets, text, text, scale))

    def promptsrc():  # the per-image path: both towers run with their deep prompts
        inputs = LossInputs(deep.image_features(image_encoder, images), targets, deep.text_features(encoder, bank),
                            frozen_text, scale, frozen_image_feats=cached, ensemble_text_feats=frozen_text)
        return sum(w * LOSS_TERMS[k](inputs) for k, w in METHODS["promptsrc"].losses.items())

    return {"promptsrc": (promptsrc, list(deep.parameters()))}, (coop, list(prompter.parameters()))


def run_group(args) -> list[dict]:
    """Time the rules of one child process. The cached group alternates the CoOp and GCSCoOp
    steps on the same model and batch, so machine noise falls on both sides of their ratio alike."""
    from gcs_tune.methods.steps import GCSAMStep, SGDStep
    from gcs_tune.model.precision import autocast as run_autocast
    from gcs_tune.model.precision import fp32

    bb, encoder, bank, prompter, images, targets = setup(args)
    cuda = bb.device.type == "cuda"
    autocast = run_autocast(bb.device, "auto")  # what a run uses: bf16 where the GPU has it natively
    special, default = make_losses(args, bb, encoder, bank, prompter, images, targets, autocast)
    current = {"name": ""}

    def closure():
        exact = current["name"] == "gcscoop"  # the engine's default: the SAM family's gradients in fp32
        with fp32(bb.device) if exact else autocast:
            loss = special.get(current["name"], default)[0]()
        loss.backward()
        return loss.detach()

    def rule(name):
        params = special.get(name, default)[1]
        opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
        return GCSAMStep(params, opt, 0.1, 0.5, 0.8) if name.startswith("gcscoop") else SGDStep(params, opt)

    names = [n for n in GROUPS[args.group] if cuda or n != "gcscoop_autocast"]  # identical to gcscoop on a CPU
    rules = {name: rule(name) for name in names}
    seconds = {name: [] for name in rules}
    peak_gpu = dict.fromkeys(rules, 0.0)
    for i in range(args.warmup + args.steps):
        for name, r in rules.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            current["name"] = name
            start = time.perf_counter()
            r.step(closure)
            if cuda:
                torch.cuda.synchronize()
                peak_gpu[name] = max(peak_gpu[name], torch.cuda.max_memory_allocated() / 2**20)
            if i >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
    device = (torch.cuda.get_device_name() if cuda
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # per process: shared by the group
    return [{"mode": name, "step_s": statistics.median(s), "steps_s": s, "peak_rss_mb": rss,
             "peak_gpu_mb": peak_gpu[name] if cuda else None, "device": device,
             "text_tokens": int(bank.eos.max()) + 1} for name, s in seconds.items()]


def main(argv=None) -> int:
    args = parse(argv)
    if args.group:
        print(json.dumps(run_group(args)))
        return 0
    rows = []
    for group in args.groups.split(","):
        child = [sys.executable, __file__, "--group", group, *(argv or sys.argv[1:])]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        for r in json.loads(out.strip().splitlines()[-1]):
            rows.append(r)
            print(f"{r['mode']:10s} {r['step_s'] * 1000:10.1f} ms/step   peak RSS {r['peak_rss_mb']:7.0f} MB"
                  + (f"   peak GPU {r['peak_gpu_mb']:7.0f} MB" if r["peak_gpu_mb"] is not None else ""), flush=True)
    t = {r["mode"]: r["step_s"] for r in rows}
    print(f"device: {rows[0]['device']}; model {args.model}, {args.classes} classes, batch {args.batch}, "
          f"text cut at {rows[0]['text_tokens']} of 77 tokens, median of {args.steps} timed steps after {args.warmup} warm-up")
    lines = {("gcscoop", "coop"): "GCSCoOp step / CoOp step            = {:.2f}  (target <= 2.1)",
             ("gcscoop_autocast", "coop"): "  same, gradients under autocast     = {:.2f}",
             ("promptsrc", "coop"): "PromptSRC step / CoOp step          = {:.2f}  (image tower fwd+bwd; two processes)",
             ("reference", "coop"): "reference step / cached+cut CoOp    = {:.1f}x (target >= 8)",
             ("reference", "full77"): "  gain of the feature cache          = {:.1f}x",
             ("full77", "coop"): "  gain of the text cut at EOS        = {:.1f}x"}
    ratios = {f"{a}_over_{b}": t[a] / t[b] for a, b in lines if a in t and b in t}
    for (a, b), line in lines.items():
        if a in t and b in t:
            print(line.format(t[a] / t[b]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "ratios": ratios}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
