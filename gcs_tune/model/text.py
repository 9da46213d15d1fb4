"""open_clip's text tower fed with embeddings instead of token ids, cut at the longest EOS.

Built from the model's own modules (shared, not copied). Because attention is causal, tokens after
the last EOS cannot change any output: running the transformer over the first max(EOS)+1
positions gives the same features as the full 77-token context, for a fraction of the cost.
"""
from __future__ import annotations

import torch
from torch import nn


class PromptedTextEncoder:
    """Holds references to a frozen open_clip text tower (CLIP, or CustomTextCLIP's ``.text``)."""

    def __init__(self, clip: nn.Module):
        tower = getattr(clip, "text", clip)  # CustomTextCLIP keeps its tower under .text
        if getattr(tower, "cls_emb", None) is not None or not hasattr(tower, "token_embedding"):
            raise TypeError(f"{type(clip).__name__}: only CLIP-style causal text towers are supported")
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding  # (77, width)
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.attn_mask = tower.attn_mask  # (77, 77) causal; open_clip attends everywhere without it
        self.width = self.positional_embedding.shape[-1]

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, 77) token ids -> (n, 77, width) token embeddings (no positions)."""
        return self.token_embedding(tokens.to(self.positional_embedding.device))

    def __call__(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """(n, L, width) prompt embeddings, (n,) EOS positions -> (n, embed_dim) text features."""
        length = int(eos.max()) + 1
        x = x[:, :length] + self.positional_embedding[:length].to(x.dtype)  # (n, length, width)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eos]  # (n, width): the EOS token's state
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (n, embed_dim)
