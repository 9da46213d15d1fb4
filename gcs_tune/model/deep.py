"""open_clip's two towers run block by block, with prompt tokens replaced before each block.

Deep prompts (PromptSRC's independent vision-language prompting, CasPL's cascaded prompts) put new
learnable tokens into the residual stream before every transformer block up to a depth. open_clip
runs its blocks inside ``Transformer.forward``; here the same block modules are called one by one,
with the model's own causal mask for the text tower, so nothing of open_clip is copied or forked.

Where the tokens go, as in the authors' code:
- text: the prompt occupies positions 1..P (after SOS). Block 0 sees the prompt built into the
  embeddings; before block l >= 1 the tokens of every segment given for layer l replace theirs.
- vision: the prompt tokens are appended after the patch tokens, after the positional embedding
  and before ``ln_pre``; before block l >= 1 a segment replaces its tokens at the end of the stream.

A *segment* is ``(offset, tokens)``: ``tokens`` (k, width) replace positions offset..offset+k of
the prompt span. A layer with no segment for some positions keeps what flowed there (CasPL keeps a
shallow CoOp context while its deep boosting tokens are replaced).
"""
from __future__ import annotations

import torch
from torch import nn

from gcs_tune.model.text import PromptedTextEncoder

Segment = tuple[int, torch.Tensor]  # (offset inside the prompt span, (k, width) tokens)
Layers = list[list[Segment]]  # one list of segments per block 1..depth-1


def replace_span(x: torch.Tensor, start: int, segments: list[Segment]) -> torch.Tensor:
    """x (n, L, w) with positions start+offset..start+offset+k replaced by each segment's tokens
    (broadcast over n). Built by concatenation, so gradients reach the tokens and never x's copy."""
    if not segments:
        return x
    pieces, at = [], 0
    for offset, tokens in sorted(segments, key=lambda s: s[0]):
        lo = start + offset
        pieces += [x[:, at:lo], tokens.to(x.dtype).expand(x.shape[0], -1, -1)]
        at = lo + tokens.shape[0]
    pieces.append(x[:, at:])
    return torch.cat(pieces, dim=1)


def _blocks(transformer: nn.Module, x: torch.Tensor, start, layers: Layers, mask=None) -> torch.Tensor:
    """Run ``transformer``'s blocks on batch-first x, replacing the prompt span before blocks 1..
    ``start`` is an int, or a callable of the sequence length (the vision prompt sits at the end)."""
    if not getattr(transformer, "batch_first", True):
        x = x.transpose(0, 1)
    for i, block in enumerate(transformer.resblocks):
        if 1 <= i <= len(layers):
            seq = x if getattr(transformer, "batch_first", True) else x.transpose(0, 1)
            at = start(seq.shape[1]) if callable(start) else start
            seq = replace_span(seq, at, layers[i - 1])
            x = seq if getattr(transformer, "batch_first", True) else seq.transpose(0, 1)
        x = block(x, attn_mask=mask)
    if not getattr(transformer, "batch_first", True):
        x = x.transpose(0, 1)
    return x


def deep_text(encoder: PromptedTextEncoder, x: torch.Tensor, eos: torch.Tensor, layers: Layers) -> torch.Tensor:
    """(n, L, width) prompt embeddings with the layer-0 prompt at positions 1..P, (n,) EOS
    positions, deep segments -> (n, embed_dim). ``layers == []`` is the shallow encoder exactly."""
    if not layers:
        return encoder(x, eos)
    length = int(eos.max()) + 1  # exact under the causal mask: the prompt sits before every EOS
    x = x[:, :length] + encoder.positional_embedding[:length].to(x.dtype)
    mask = encoder.attn_mask[:length, :length] if encoder.attn_mask is not None else None
    x = _blocks(encoder.transformer, x, 1, layers, mask)
    x = encoder.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eos]  # (n, width): the EOS token's state
    proj = encoder.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class PromptedImageEncoder:
    """open_clip's VisionTransformer with prompt tokens appended to its token sequence.

    Holds references to the frozen tower's modules (shared, not copied). Only CLIP-style ViTs with
    a class-token pool are supported: an attention-pool tower would pool over the prompts too."""

    def __init__(self, clip: nn.Module):
        visual = clip.visual
        if not hasattr(visual, "class_embedding") or getattr(visual, "attn_pool", None) is not None:
            raise TypeError(f"{type(visual).__name__}: vision prompts need a ViT image tower with a class token")
        self.visual = visual
        self.width = visual.class_embedding.shape[-1]
        self.layers = len(visual.transformer.resblocks)

    def __call__(self, pixels: torch.Tensor, first: torch.Tensor | None, layers: Layers) -> torch.Tensor:
        """(B, 3, H, W) pixels, (P, width) layer-0 prompt tokens (None: no prompt), deep segments
        -> (B, embed_dim) image features, unnormalised as ``encode_image``'s."""
        v = self.visual
        x = v.conv1(pixels)  # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid², width)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1 + grid², width)
        x = v.patch_dropout(x)
        n_prompt = 0 if first is None else first.shape[0]
        if n_prompt:
            x = torch.cat([x, first.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)
        x = _blocks(v.transformer, x, lambda length: length - n_prompt, layers)
        pooled, _ = v._pool(x[:, : x.shape[1] - n_prompt])  # the prompt tokens are never pooled
        return pooled @ v.proj if v.proj is not None else pooled


def tower_depth(requested: int, layers: int) -> int:
    """The prompt depth a tower can take: ``requested`` clipped to its number of blocks (PromptSRC
    asks for 9 on ViT-B/16's 12; the lab's towers have 4)."""
    return max(1, min(requested, layers))
