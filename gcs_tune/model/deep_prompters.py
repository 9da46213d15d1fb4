"""Deep vision-language prompters: PromptSRC's independent prompts and CasPL's cascade.

A prompter here is made of *groups*. A group holds a layer-0 text prompt (k tokens after SOS), its
replacements for text blocks 1.., a layer-0 vision prompt (appended after the patch tokens) and its
replacements for vision blocks 1... :func:`compose` lays several groups side by side -- CasPL puts
the adapting prompt before the boosting prompt in the text ([SOS] adapt boost <name>) and after it
in the image ([CLS] patches boost adapt), as the authors' code does.

Interface (as every prompter's, see :mod:`gcs_tune.model.prompters`), plus
``image_features(image_encoder, pixels) -> (B, embed_dim)``: a prompter that has it changes the
image features, so its method reads pixels instead of the feature cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gcs_tune.model.deep import Layers, PromptedImageEncoder, deep_text, tower_depth
from gcs_tune.model.prompters import ClassBank, phrase_embedding
from gcs_tune.model.text import PromptedTextEncoder


@dataclass(frozen=True)
class PromptGroup:
    text: torch.Tensor | None  # (k, text width) layer-0 tokens
    text_deep: tuple[torch.Tensor, ...] = ()  # (k, text width) for text blocks 1, 2, ...
    vision: torch.Tensor | None = None  # (kv, vision width) layer-0 tokens
    vision_deep: tuple[torch.Tensor, ...] = field(default=())  # (kv, vision width) for blocks 1, 2, ...


def _layers(groups: list[tuple[int, tuple[torch.Tensor, ...]]]) -> Layers:
    """[(offset, per-layer tokens)] -> one segment list per block 1..max depth - 1."""
    depth = max((len(deep) for _, deep in groups), default=0)
    return [[(offset, deep[i]) for offset, deep in groups if i < len(deep)] for i in range(depth)]


def compose(groups: list[PromptGroup], vision_order: list[int] | None = None):
    """(text layer-0 tokens, text layers, vision layer-0 tokens or None, vision layers)."""
    text, deep_t, at = [], [], 0
    for g in groups:
        if g.text is not None:
            text.append(g.text)
            deep_t.append((at, g.text_deep))
            at += g.text.shape[0]
    vision, deep_v, at = [], [], 0
    for g in (groups[i] for i in (vision_order or range(len(groups)))):
        if g.vision is not None:
            vision.append(g.vision)
            deep_v.append((at, g.vision_deep))
            at += g.vision.shape[0]
    return (torch.cat(text), _layers(deep_t), torch.cat(vision) if vision else None, _layers(deep_v))


def _normal(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.02  # the authors' N(0, 0.02) init


class DeepPrompter(nn.Module):
    """PromptSRC / IVLP: M text tokens (the last min(k, M) from ``init``, as CoOp) and new text
    tokens before each text block up to ``depth``; Mv vision tokens and new ones before each vision
    block up to ``depth``. ``depth`` is clipped to each tower's number of blocks."""

    def __init__(self, text: PromptedTextEncoder, image: PromptedImageEncoder, tokenizer, n_ctx: int,
                 init: str | None, n_ctx_vision: int, depth: int, generator: torch.Generator | None = None):
        super().__init__()
        device = text.positional_embedding.device
        depth_t = tower_depth(depth, len(text.transformer.resblocks))
        depth_v = tower_depth(depth, image.layers)
        ctx = _normal((n_ctx, text.width), generator)
        if init:
            phrase = phrase_embedding(text, tokenizer, init).cpu()  # (k, width)
            take = min(n_ctx, phrase.shape[0])
            ctx[n_ctx - take:] = phrase[phrase.shape[0] - take:]
        self.ctx = nn.Parameter(ctx.to(device))  # (M, text width)
        self.text_deep = nn.Parameter(_normal((depth_t - 1, n_ctx, text.width), generator).to(device))
        self.vision = nn.Parameter(_normal((depth_v, n_ctx_vision, image.width), generator).to(device))
        self.n_ctx, self.depth = n_ctx, (depth_t, depth_v)

    def group(self) -> PromptGroup:
        return PromptGroup(self.ctx, tuple(self.text_deep), self.vision[0], tuple(self.vision[1:]))

    def text_features(self, encoder: PromptedTextEncoder, bank: ClassBank) -> torch.Tensor:
        return _text(encoder, bank, [self.group()])

    def image_features(self, encoder: PromptedImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
        return _image(encoder, pixels, [self.group()])


def _text(encoder: PromptedTextEncoder, bank: ClassBank, groups: list[PromptGroup]) -> torch.Tensor:
    tokens, layers, _, _ = compose(groups)
    ctx = tokens.to(bank.prefix.dtype).expand(bank.prefix.shape[0], -1, -1)  # (n, P, width)
    x = torch.cat([bank.prefix, ctx, bank.suffix], dim=1)  # (n, L, width)
    return deep_text(encoder, x, bank.eos, layers)  # (n, embed_dim)


def _image(encoder: PromptedImageEncoder, pixels: torch.Tensor, groups: list[PromptGroup],
           order: list[int] | None = None) -> torch.Tensor:
    _, _, first, layers = compose(groups, order)
    return encoder(pixels, first, layers)  # (B, embed_dim)


class CascadePrompter(nn.Module):
    """CasPL stage 2: a frozen boosting prompt (a :class:`DeepPrompter` trained in stage 1) and
    the host method's own prompter, the adapting prompt, trained as the host trains it. The text
    reads [SOS] adapt boost <name>; the image [CLS] patches boost adapt."""

    def __init__(self, boost: DeepPrompter, adapt: nn.Module):
        super().__init__()
        if getattr(adapt, "ctx", None) is not None and adapt.ctx.dim() != 2:
            raise ValueError("CasPL cascades a shared context; prompt.class_specific is not supported")
        self.boost = boost.requires_grad_(False)  # frozen: its tensors never reach the optimiser
        self.adapt = adapt
        self.n_ctx = adapt.n_ctx + boost.n_ctx  # text tokens after SOS: what the class bank reserves

    def _groups(self) -> list[PromptGroup]:
        group = getattr(self.adapt, "group", None)
        adapt = group() if group else PromptGroup(self.adapt.ctx)  # CoOp: a shallow text-only group
        return [adapt, self.boost.group()]

    def text_features(self, encoder: PromptedTextEncoder, bank: ClassBank) -> torch.Tensor:
        return _text(encoder, bank, self._groups())

    def image_features(self, encoder: PromptedImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
        return _image(encoder, pixels, self._groups(), order=[1, 0])
