"""Gated cross-attention from text tokens to resampled image latents (SPEC 1).

Media and media locations are explicit forward arguments (never module state), so activation-checkpoint
recomputation of a block always sees the media of the forward that built its graph. Parameter names mirror
the reference (`attn.{norm,to_q,to_kv,to_out}`, `attn_gate`, `ff.{0,1,3}`, `ff_gate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_composer.models.perceiver import FeedForward, attention, merge_heads, norm_heads, split_heads


def media_text_time(input_ids: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """(B, L) ids -> (B, L) long: how many `<image>` tokens occur up to and including each position.

    Token i attends to image number text_time[i] (1-based); 0 means "no image yet".
    """
    return (input_ids == media_token_id).cumsum(dim=-1)


Segments = tuple[torch.Tensor, torch.Tensor]  # (positions (B, T_img, S) long, valid (B, T_img, S) bool)


def image_segments(text_time: torch.Tensor, num_images: int) -> Segments:
    """Where each image's text lies: text_time (B, L) -> (positions (B, T, S), valid (B, T, S)).

    text_time never decreases along a row, so the tokens of image t (1-based) are one contiguous run; S is the
    longest run in the batch (a host read: training batches bring this, computed on the host), at least 1: with no
    run at all every entry is invalid, and the attention still runs, so every parameter stays in the graph (DDP and
    FSDP expect the same on every rank).
    positions[b, t - 1, s] is the s-th token of image t in row b.
    """
    b, length = text_time.shape
    slots = torch.arange(1, num_images + 1, device=text_time.device)  # (T,)
    in_image = text_time.unsqueeze(1) == slots[None, :, None]  # (B, T, L)
    counts = in_image.sum(-1)  # (B, T)
    longest = max(1, int(counts.max()) if counts.numel() else 0)
    starts = in_image.int().argmax(-1)  # (B, T): first token of each image (0 when it has none; masked below)
    offsets = torch.arange(longest, device=text_time.device)  # (S,)
    positions = (starts.unsqueeze(-1) + offsets).clamp(max=length - 1)  # (B, T, S)
    valid = offsets < counts.unsqueeze(-1)  # (B, T, S)
    return positions, valid


class MaskedCrossAttention(nn.Module):
    """Text queries attend only to the latents of their most recent image ("only attend immediate media").

    Two exact forms (equal within fp32 rounding; `per_image` picks one, the factory's `cross_attention` key):
    - masked (default, the reference's): every token against all T_img x n latents behind a mask;
    - per image: each image's text (a contiguous run of tokens, see `image_segments`) against that image's n
      latents alone, no mask: (B*T) attentions of (S x n), T times fewer scores and no (B, L, T*n) mask.
    Measured on CPU (benchmarks/bench.py, bench-cpu.yaml) the two take the same time (matmuls dominate); the masked
    form's summation order is the one the parity fixture was checked with. `qk_norm`: a LayerNorm over each
    head's queries and keys (`q_norm`, `k_norm`), as in the perceiver.
    """

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, per_image: bool = False,
                 qk_norm: bool = False):  # fmt: skip
        super().__init__()
        self.heads = heads
        self.per_image = per_image
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(dim_head), nn.LayerNorm(dim_head)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor, segments: Segments | None = None
    ) -> torch.Tensor:
        """x (B, L, D_lm), media (B, T_img, n, D_vis), text_time (B, L) -> (B, L, D_lm).

        Tokens with text_time == 0 (before the first `<image>`) or beyond the last media slot get zero output.
        `segments`: `image_segments(text_time, T_img)` when the caller computed it on the host (training batches:
        the per-image form then reads no value from the device); None: computed here.
        """
        if text_time.shape != x.shape[:2]:
            raise ValueError(f"text_time shape {tuple(text_time.shape)} does not match text shape {tuple(x.shape[:2])}")
        if media.shape[0] != x.shape[0]:
            raise ValueError(f"media batch {media.shape[0]} != text batch {x.shape[0]}")
        q = self.to_q(self.norm(x))  # (B, L, h*d)
        k, v = self.to_kv(media).chunk(2, dim=-1)  # 2 x (B, T, n, h*d)
        if self.qk_norm:
            q, k = norm_heads(q, self.q_norm, self.heads), norm_heads(k, self.k_norm, self.heads)
        attend = self._attend_per_image if self.per_image else self._attend_masked
        return self.to_out(attend(q, k, v, text_time, segments))  # (B, L, D_lm)

    def _attend_masked(self, q, k, v, text_time: torch.Tensor, segments: Segments | None) -> torch.Tensor:
        b, t_img, n, inner = k.shape
        q = split_heads(q, self.heads)  # (B, h, L, d)
        k, v = (split_heads(t.reshape(b, t_img * n, inner), self.heads) for t in (k, v))  # (B, h, T*n, d)
        media_time = torch.arange(1, t_img + 1, device=q.device).repeat_interleave(n)  # (T*n,)
        has_media = (text_time >= 1) & (text_time <= t_img)  # (B, L)
        allowed = text_time.unsqueeze(-1) == media_time  # (B, L, T*n)
        # Rows without media would be fully masked (NaN in SDPA): let them attend anywhere, then zero them.
        allowed = allowed | ~has_media.unsqueeze(-1)  # (B, L, T*n)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1)))  # (B, L, h*d)
        return out.masked_fill(~has_media.unsqueeze(-1), 0.0)  # (B, L, h*d)

    def _attend_per_image(self, q, k, v, text_time: torch.Tensor, segments: Segments | None) -> torch.Tensor:
        b, t_img, _, inner = k.shape
        positions, valid = segments if segments is not None else image_segments(text_time, t_img)  # (B, T, S)
        index = positions.reshape(b, -1, 1).expand(-1, -1, inner)  # (B, T*S, h*d)
        q_seg = split_heads(q.gather(1, index).reshape(b, t_img, -1, inner), self.heads)  # (B, T, h, S, d)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)  # (B, T, h, n, d)
        attended = merge_heads(attention(q_seg, k, v))  # (B, T, S, h*d)
        attended = attended * valid.unsqueeze(-1)  # padding slots of short runs contribute nothing
        # Each valid token is in exactly one run: summing the runs back places every token once (zero elsewhere).
        return q.new_zeros(q.shape).scatter_add(1, index, attended.reshape(b, -1, inner))  # (B, L, h*d)


class GatedCrossAttentionBlock(nn.Module):
    """x = xattn(x) * tanh(attn_gate) + x; x = ff(x) * tanh(ff_gate) + x. Gates start at 0 (block = identity)."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4,
                 per_image: bool = False, qk_norm: bool = False):  # fmt: skip
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads,
                                         per_image=per_image, qk_norm=qk_norm)  # fmt: skip
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))  # (1,) as in the reference checkpoints
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))  # (1,)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor, segments: Segments | None = None
    ) -> torch.Tensor:
        """x (B, L, D_lm), media (B, T_img, n, D_vis), text_time (B, L) -> (B, L, D_lm), in x's dtype: the LM's
        residual stream keeps its own dtype (bf16 frozen weights under autocast), not the fp32 gates'."""
        residual_dtype = x.dtype
        x = self.attn(x, media, text_time, segments) * self.attn_gate.tanh() + x  # (B, L, D_lm)
        x = self.ff(x) * self.ff_gate.tanh() + x  # (B, L, D_lm)
        return x.to(residual_dtype)
