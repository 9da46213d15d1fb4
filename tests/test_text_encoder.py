"""The prompted text encoder reproduces open_clip's own encode_text (METHODS.md)."""
import open_clip
import pytest
import torch

from gcs_tune.model.prompters import CoOpPrompter, build_bank, phrase_embedding
from gcs_tune.model.text import PromptedTextEncoder

CLASSES = ["red circle", "blue star", "golden retriever", "Boeing 737-800", "a"]


@pytest.fixture(scope="module", params=["lab-vit-tiny", "ViT-B-16"])
def clip(request):
    torch.manual_seed(0)
    import gcs_tune.model.backbone  # noqa: F401  registers lab-vit-tiny
    model = open_clip.create_model(request.param, pretrained=None).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(request.param)


def coop_with_phrase(encoder, tokenizer, n_ctx=4):
    return CoOpPrompter(encoder, tokenizer, n_ctx=n_ctx, init="a photo of a", n_train_classes=len(CLASSES))


@torch.no_grad()
def test_prompted_features_equal_encode_text(clip):
    model, tokenizer = clip
    encoder = PromptedTextEncoder(model)
    bank = build_bank(encoder, tokenizer, CLASSES, list(range(len(CLASSES))), n_ctx=4)
    assert bank.prefix.shape[1] + 4 + bank.suffix.shape[1] < 77  # cut at the longest EOS
    ours = coop_with_phrase(encoder, tokenizer).text_features(encoder, bank)
    reference = model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_causal_mask_matters(clip):
    model, tokenizer = clip
    encoder = PromptedTextEncoder(model)
    bank = build_bank(encoder, tokenizer, CLASSES, list(range(len(CLASSES))), n_ctx=4)
    prompter = coop_with_phrase(encoder, tokenizer)
    with_mask = prompter.text_features(encoder, bank)
    encoder.attn_mask = None  # what open_clip does when no mask is passed: attend everywhere
    without = prompter.text_features(encoder, bank)
    assert (with_mask - without).abs().max() > 1e-3


@torch.no_grad()
def test_phrase_fills_the_slots_next_to_the_class_name(clip):
    model, tokenizer = clip
    encoder = PromptedTextEncoder(model)
    phrase = phrase_embedding(encoder, tokenizer, "a photo of a")  # (4, width)
    long = CoOpPrompter(encoder, tokenizer, 8, "a photo of a", 3, generator=torch.Generator().manual_seed(0))
    short = CoOpPrompter(encoder, tokenizer, 2, "a photo of a", 3)
    assert torch.equal(long.ctx[4:], phrase) and long.ctx[:4].std() < 0.05
    assert torch.equal(short.ctx, phrase[2:])


def test_only_the_context_is_trainable(clip):
    model, tokenizer = clip
    encoder = PromptedTextEncoder(model)
    prompter = coop_with_phrase(encoder, tokenizer)
    bank = build_bank(encoder, tokenizer, CLASSES[:2], [0, 1], n_ctx=4)
    prompter.text_features(encoder, bank).sum().backward()
    assert [n for n, _ in prompter.named_parameters()] == ["ctx"]
    assert prompter.ctx.grad is not None and prompter.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@torch.no_grad()
def test_class_specific_context_uses_the_mean_for_unseen_classes(clip):
    model, tokenizer = clip
    encoder = PromptedTextEncoder(model)
    prompter = CoOpPrompter(encoder, tokenizer, 4, None, n_train_classes=2, class_specific=True)
    prompter.ctx.normal_()
    ctx = prompter.context_for(torch.tensor([0, 1, 4]))
    assert torch.equal(ctx[0], prompter.ctx[0]) and torch.equal(ctx[1], prompter.ctx[1])
    torch.testing.assert_close(ctx[2], prompter.ctx.mean(0))
