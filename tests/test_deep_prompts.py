"""Deep prompts on open_clip's towers (gcs_tune.model.deep): the block-by-block runners against
open_clip's own forward with the same tokens put in by hooks, and the prompters' layouts."""
import open_clip
import pytest
import torch

from gcs_tune.model.deep import PromptedImageEncoder, deep_text, replace_span, tower_depth
from gcs_tune.model.deep_prompters import CascadePrompter, DeepPrompter, compose
from gcs_tune.model.prompters import CoOpPrompter, build_bank
from gcs_tune.model.text import PromptedTextEncoder

CLASSES = ["red circle", "blue star", "green crescent"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    import gcs_tune.model.backbone  # noqa: F401  registers lab-vit-tiny
    model = open_clip.create_model("lab-vit-tiny", pretrained=None).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer("lab-vit-tiny")


def replacing_hooks(blocks, start, tokens):
    """Forward pre-hooks that put tokens[i - 1] at positions start..start+k before block i >= 1 (the
    reference: open_clip's own Transformer.forward runs the blocks)."""
    def hook_for(t):
        def hook(module, args, kwargs):
            x = args[0].clone()
            at = start(x.shape[1]) if callable(start) else start
            x[:, at:at + t.shape[0]] = t
            return (x, *args[1:]), kwargs
        return hook
    return [blocks[i + 1].register_forward_pre_hook(hook_for(t), with_kwargs=True) for i, t in enumerate(tokens)]


@torch.no_grad()
def test_image_encoder_without_prompts_is_encode_image(clip):
    model, _ = clip
    pixels = torch.randn(3, 3, 32, 32)
    ours = PromptedImageEncoder(model)(pixels, None, [])
    torch.testing.assert_close(ours, model.encode_image(pixels), rtol=0, atol=1e-5)


@torch.no_grad()
def test_vision_prompts_are_appended_before_ln_pre_and_replaced_before_each_block(clip):
    model, _ = clip
    enc, pixels = PromptedImageEncoder(model), torch.randn(2, 3, 32, 32)
    first, deep = torch.randn(3, enc.width), [torch.randn(3, enc.width) for _ in range(2)]  # blocks 1 and 2
    append = model.visual.ln_pre.register_forward_pre_hook(
        lambda m, args: (torch.cat([args[0], first.expand(args[0].shape[0], -1, -1)], dim=1),))
    hooks = replacing_hooks(model.visual.transformer.resblocks, lambda n: n - 3, deep)
    try:
        reference = model.encode_image(pixels)  # open_clip's forward; its class-token pool ignores the rest
    finally:
        for h in [append, *hooks]:
            h.remove()
    ours = enc(pixels, first, [[(0, t)] for t in deep])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, model.encode_image(pixels), atol=1e-3)  # the prompts matter


@torch.no_grad()
def test_text_prompts_replace_positions_after_sos_before_each_block(clip):
    model, tokenizer = clip
    text = PromptedTextEncoder(model)
    bank = build_bank(text, tokenizer, CLASSES, [0, 1, 2], n_ctx=4)
    ctx = torch.randn(4, text.width) * 0.02
    x = torch.cat([bank.prefix, ctx.expand(3, -1, -1), bank.suffix], dim=1)
    deep = [torch.randn(4, text.width) * 0.02 for _ in range(3)]  # blocks 1..3 of 4
    hooks = replacing_hooks(text.transformer.resblocks, 1, deep)
    try:
        reference = text(x, bank.eos)  # open_clip's Transformer.forward with the causal mask
    finally:
        for h in hooks:
            h.remove()
    ours = deep_text(text, x, bank.eos, [[(0, t)] for t in deep])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(deep_text(text, x, bank.eos, []), text(x, bank.eos), rtol=0, atol=0)


def test_replace_span_keeps_what_no_segment_covers():
    x = torch.arange(10.0).view(1, 10, 1)
    out = replace_span(x, 1, [(3, torch.full((2, 1), -1.0)), (0, torch.full((1, 1), -2.0))])
    assert out.view(-1).tolist() == [0, -2, 2, 3, -1, -1, 6, 7, 8, 9]


def test_depth_is_clipped_to_the_towers(clip):
    model, tokenizer = clip
    text, image = PromptedTextEncoder(model), PromptedImageEncoder(model)
    p = DeepPrompter(text, image, tokenizer, 4, "a photo of a", 2, depth=9, generator=torch.Generator().manual_seed(0))
    assert tower_depth(9, 4) == 4 and p.depth == (4, 4)
    assert p.ctx.shape == (4, 128) and p.text_deep.shape == (3, 4, 128) and p.vision.shape == (4, 2, 128)
    coop = CoOpPrompter(text, tokenizer, 4, "a photo of a", 3)
    torch.testing.assert_close(p.ctx, coop.ctx)  # the layer-0 text prompt starts as CoOp's


def test_cascade_layout_adapt_then_boost_in_text_boost_then_adapt_in_image(clip):
    model, tokenizer = clip
    text, image = PromptedTextEncoder(model), PromptedImageEncoder(model)
    gen = torch.Generator().manual_seed(1)
    boost = DeepPrompter(text, image, tokenizer, 8, None, 8, depth=12, generator=gen)
    adapt = DeepPrompter(text, image, tokenizer, 4, "a photo of a", 4, depth=2, generator=gen)
    cascade = CascadePrompter(boost, adapt)
    tokens, layers, first, vlayers = compose(cascade._groups(), [1, 0])
    assert torch.equal(tokens, torch.cat([adapt.ctx, boost.ctx])) and cascade.n_ctx == 12
    assert torch.equal(first, torch.cat([boost.vision[0], adapt.vision[0]]))
    assert [[o for o, _ in seg] for seg in layers] == [[0, 4], [4], [4]]  # adapt is 2 deep, boost 4
    assert [[o for o, _ in seg] for seg in vlayers] == [[0, 8], [0], [0]]
    assert all(not p.requires_grad for p in cascade.boost.parameters())
    assert {n for n, p in cascade.named_parameters() if p.requires_grad} == {"adapt.ctx", "adapt.text_deep", "adapt.vision"}
    coop = CascadePrompter(boost, CoOpPrompter(text, tokenizer, 4, "a photo of a", 3))
    tokens, layers, first, _ = compose(coop._groups(), [1, 0])
    assert [[o for o, _ in seg] for seg in layers] == [[4], [4], [4]]  # CoOp's context is never replaced
    assert torch.equal(first, boost.vision[0])
