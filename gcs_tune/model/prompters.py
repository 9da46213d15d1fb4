"""Prompters: the small trainable part. A prompter turns class names into text features.

Interface every prompter keeps (so the engine never branches on a method's name):
- ``prompter.parameters()``: what the step rule updates;
- ``prompter.text_features(encoder, bank) -> (n_cls, D)``;
- ``prompter.state_dict()``: what is exported as the learned prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gcs_tune.model.text import PromptedTextEncoder

PLACEHOLDER = "X"  # one token per context slot in "X X X X {classname}."


@dataclass(frozen=True)
class ClassBank:
    """Frozen token embeddings of "[SOS] X…X <classname> . [EOS]" for a list of classes,
    already cut at the longest EOS so the text encoder only sees tokens that matter."""

    labels: torch.Tensor  # (n,) the classes' labels in the dataset
    prefix: torch.Tensor  # (n, 1, width): SOS
    suffix: torch.Tensor  # (n, L - 1 - n_ctx, width): class name, '.', EOS (L = max EOS + 1)
    eos: torch.Tensor  # (n,) EOS position in the full prompt


def build_bank(encoder: PromptedTextEncoder, tokenizer, classnames: list[str], labels: list[int],
               n_ctx: int) -> ClassBank:
    context = " ".join([PLACEHOLDER] * n_ctx)
    tokens = tokenizer([f"{context} {name}." for name in classnames])  # (n, 77)
    eos = tokens.argmax(dim=-1)  # EOT is the largest id in CLIP's vocabulary
    emb = encoder.embed(tokens)[:, : int(eos.max()) + 1]  # (n, L, width)
    device = emb.device
    return ClassBank(labels=torch.tensor(labels, device=device), prefix=emb[:, :1],
                     suffix=emb[:, 1 + n_ctx:], eos=eos.to(device))


def phrase_embedding(encoder: PromptedTextEncoder, tokenizer, phrase: str) -> torch.Tensor:
    """(k, width) word embeddings of ``phrase`` without SOS/EOS."""
    tokens = tokenizer([phrase])[0]
    k = int(tokens.argmax()) - 1
    return encoder.embed(tokens[None])[0, 1:1 + k]


class CoOpPrompter(nn.Module):
    """CoOp: M learnable context vectors before the class name, shared by all classes or one set
    per training class. A phrase of k tokens initialises the last min(k, M) slots (the ones next
    to the class name); other slots start from N(0, 0.02), as CoOp's random init."""

    def __init__(self, encoder: PromptedTextEncoder, tokenizer, n_ctx: int, init: str | None,
                 n_train_classes: int, class_specific: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        width = encoder.width
        ctx = torch.randn(n_ctx, width, generator=generator) * 0.02  # (M, width)
        if init:
            phrase = phrase_embedding(encoder, tokenizer, init).cpu()  # (k, width)
            take = min(n_ctx, phrase.shape[0])
            ctx[n_ctx - take:] = phrase[phrase.shape[0] - take:]
        if class_specific:
            ctx = ctx.expand(n_train_classes, -1, -1).clone()  # (n_train, M, width)
        self.ctx = nn.Parameter(ctx.to(encoder.positional_embedding.device))
        self.n_ctx, self.n_train_classes = n_ctx, n_train_classes

    def context_for(self, labels: torch.Tensor) -> torch.Tensor:
        """(n, M, width). Class-specific contexts exist for training classes only; classes never
        trained on (novel ones) use the mean of the learned contexts."""
        if self.ctx.dim() == 2:
            return self.ctx.expand(len(labels), -1, -1)
        known = labels < self.n_train_classes
        mean = self.ctx.mean(dim=0, keepdim=True).expand(len(labels), -1, -1)
        picked = self.ctx[labels.clamp(max=self.n_train_classes - 1)]
        return torch.where(known[:, None, None], picked, mean)

    def text_features(self, encoder: PromptedTextEncoder, bank: ClassBank) -> torch.Tensor:
        ctx = self.context_for(bank.labels).to(bank.prefix.dtype)
        x = torch.cat([bank.prefix, ctx, bank.suffix], dim=1)  # (n, L, width)
        return encoder(x, bank.eos)  # (n, embed_dim)
