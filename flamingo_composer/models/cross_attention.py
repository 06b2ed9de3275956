"""Gated cross-attention from text tokens to resampled image latents (SPEC 1).

Media and media locations are explicit forward arguments (never module state), so activation-checkpoint
recomputation of a block always sees the media of the forward that built its graph. Parameter names mirror
the reference (`attn.{norm,to_q,to_kv,to_out}`, `attn_gate`, `ff.{0,1,3}`, `ff_gate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_composer.models.perceiver import feed_forward, merge_heads, split_heads


def media_text_time(input_ids: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """(B, L) ids -> (B, L) long: how many `<image>` tokens occur up to and including each position.

    Token i attends to image number text_time[i] (1-based); 0 means "no image yet".
    """
    return (input_ids == media_token_id).cumsum(dim=-1)


class MaskedCrossAttention(nn.Module):
    """Text queries attend only to the latents of their most recent image ("only attend immediate media")."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """x (B, L, D_lm), media (B, T_img, n, D_vis), text_time (B, L) -> (B, L, D_lm).

        Tokens with text_time == 0 (before the first `<image>`) or beyond the last media slot get zero output.
        """
        b, t_img, n, _ = media.shape
        if text_time.shape != x.shape[:2]:
            raise ValueError(f"text_time shape {tuple(text_time.shape)} does not match text shape {tuple(x.shape[:2])}")
        if media.shape[0] != b or x.shape[0] != b:
            raise ValueError(f"media batch {media.shape[0]} != text batch {x.shape[0]}")
        x = self.norm(x)  # (B, L, D_lm)
        q = split_heads(self.to_q(x), self.heads)  # (B, h, L, d)
        k, v = self.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)  # 2 x (B, T*n, h*d)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)  # (B, h, T*n, d)

        media_time = torch.arange(1, t_img + 1, device=x.device).repeat_interleave(n)  # (T*n,)
        has_media = (text_time >= 1) & (text_time <= t_img)  # (B, L)
        allowed = text_time.unsqueeze(-1) == media_time  # (B, L, T*n)
        # Rows without media would be fully masked (NaN in SDPA): let them attend anywhere, then zero them.
        allowed = allowed | ~has_media.unsqueeze(-1)  # (B, L, T*n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))  # (B, h, L, d)
        out = merge_heads(out)  # (B, L, h*d)
        out = out.masked_fill(~has_media.unsqueeze(-1), 0.0)  # (B, L, h*d)
        return self.to_out(out)  # (B, L, D_lm)


class GatedCrossAttentionBlock(nn.Module):
    """x = xattn(x) * tanh(attn_gate) + x; x = ff(x) * tanh(ff_gate) + x. Gates start at 0 (block = identity)."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))  # (1,) as in the reference checkpoints
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))  # (1,)

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """x (B, L, D_lm), media (B, T_img, n, D_vis), text_time (B, L) -> (B, L, D_lm)."""
        x = self.attn(x, media, text_time) * self.attn_gate.tanh() + x  # (B, L, D_lm)
        x = self.ff(x) * self.ff_gate.tanh() + x  # (B, L, D_lm)
        return x
