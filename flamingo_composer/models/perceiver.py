"""Perceiver resampler: turns each image's patch tokens into a fixed set of latents (SPEC 1).

Parameter names mirror the reference OpenFlamingo implementation (`latents`,
`layers.{i}.0.{norm_media,norm_latents,to_q,to_kv,to_out}`, `layers.{i}.1.{0,1,3}`, `norm`) so released
checkpoints load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GeluLinear(torch.autograd.Function):
    """gelu(h) @ W^T that keeps only h for backward and recomputes gelu(h) there for W's gradient.

    Autograd would keep both h (for GELU's backward) and gelu(h) (for the trained W's gradient): two (..., 4D)
    tensors per feed-forward, the largest activations of a cross-attention block. The recomputation is one
    elementwise GELU; the gradients are autograd's own ops on the same tensors, in the dtype the forward's matmul
    ran in (bf16 under autocast, on any device): each input's gradient is cast back to that input's dtype, as
    autocast's casts do.
    """

    @staticmethod
    def forward(ctx, hidden, weight):  # hidden (..., 4D), weight (D, 4D)
        out = F.linear(F.gelu(hidden), weight)  # (..., D); under autocast both run in its dtype
        ctx.save_for_backward(hidden, weight)
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (..., D)
        hidden, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_out, low_hidden = grad_out.to(dtype), hidden.to(dtype)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.flatten(0, -2).t() @ F.gelu(low_hidden).flatten(0, -2)  # (D, 4D)
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.ops.aten.gelu_backward(grad_out @ weight.to(dtype), low_hidden)  # (..., 4D)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(D, mult*D) -> GELU -> Linear(mult*D, D), bias-free (children 0, 1, 2, 3: the
    reference's parameter names). The GELU and the last Linear run as one `_GeluLinear`."""

    def __init__(self, dim: int, mult: int = 4):
        inner_dim = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim, bias=False),
            nn.GELU(),
            nn.Linear(inner_dim, dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, up, _, down = self
        return _GeluLinear.apply(up(norm(x)), down.weight)  # (..., D)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, heads * d) -> (..., heads, N, d)."""
    *lead, n, inner = x.shape
    return x.reshape(*lead, n, heads, inner // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, N, d) -> (..., N, heads * d)."""
    *lead, heads, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, heads * d)


def norm_heads(x: torch.Tensor, norm: nn.Module, heads: int) -> torch.Tensor:
    """A LayerNorm over each head's slice: x (..., heads * d) -> (..., heads * d), `norm` over d (qk-norm)."""
    return norm(x.unflatten(-1, (heads, -1))).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over any leading dims: q (..., h, n, d), k and v (..., h, m, d) -> (..., h, n, d).

    The leading dims are merged into one batch dim for SDPA: its fused kernels (flash on CPU and CUDA,
    memory-efficient on CUDA) take 4-D inputs only, and a 5-D call falls back to the math path, which
    materialises and saves the (..., h, n, m) attention weights (measured on the bench perceiver: 11% slower and
    28% more memory).
    """
    lead = q.shape[:-3]
    out = F.scaled_dot_product_attention(*(t.reshape(-1, *t.shape[-3:]) for t in (q, k, v)))  # (N, h, n, d)
    return out.unflatten(0, lead)  # (..., h, n, d)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents); separate LayerNorms for media and latents.

    `qk_norm`: a LayerNorm over each head's queries and keys (`q_norm`, `k_norm`, as IDEFICS's
    `qk_layer_norms`), for training from scratch; the released models have none.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(dim_head), nn.LayerNorm(dim_head)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (N, v, D), latents (N, n, D) -> (N, n, D)."""
        media = self.norm_media(media)  # (N, v, D)
        latents = self.norm_latents(latents)  # (N, n, D)
        q = self.to_q(latents)  # (N, n, h*d)
        kv_input = torch.cat((media, latents), dim=-2)  # (N, v + n, D)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)  # 2 x (N, v + n, h*d)
        if self.qk_norm:
            q, k = norm_heads(q, self.q_norm, self.heads), norm_heads(k, self.k_norm, self.heads)
        q = split_heads(q, self.heads)  # (N, h, n, d)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)  # (N, h, v + n, d)
        out = attention(q, k, v)  # (N, h, n, d)
        return self.to_out(merge_heads(out))  # (N, n, D)


class PerceiverResampler(nn.Module):
    """Patch tokens (N, v, D) -> latents (N, num_latents, D), each image resampled independently.

    One frame per image and no media-time or frame embeddings: the released models have none, so the reference's
    (B, T_img, F, v, D) axes reduce to one image axis and its parameters load unchanged.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        ff_mult: int = 4,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))  # (n, D), init std 1
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads, qk_norm=qk_norm),
                           FeedForward(dim, ff_mult)])  # fmt: skip
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if media.dim() != 3:
            raise ValueError(f"PerceiverResampler expects patch tokens (N, v, D), got shape {tuple(media.shape)}")
        latents = self.latents.expand(media.shape[0], *self.latents.shape)  # (N, n, D)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents  # (N, n, D)
            latents = ff(latents) + latents  # (N, n, D)
        return self.norm(latents)  # (N, n, D)
