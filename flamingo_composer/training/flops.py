"""Frozen-aware FLOP count of one Flamingo training step, per dataset (for SpeedMonitor's MFU and benchmarks/bench.py).

A matmul with N weights costs 2N FLOPs per token forward. Backward costs another 2N for the activation gradient
and 2N for the weight gradient, but frozen parts skip the weight gradient:
- vision encoder (frozen, no autograd): forward only, its FLOPs per image measured once (vision.measure_tower),
  times the images actually encoded;
- perceiver and gated cross-attention blocks (trainable): 6N per token they process;
- LM decoder layers and head (frozen): 2N forward + 2N activation gradient per text token where a trainable
  parameter lies below them (the new-token embedding rows, or a cross-attention block), else 2N (a
  mixture-of-experts layer: only the top-k of its E routed experts per token); the head only at
  the supervised positions when the training loss projects just those (LMs with a head module);
- attention score/value products (no weights): 4*q*k*d forward, twice that backward when gradients pass.
Norms, biases, activations and embedding look-ups are ignored (they are not matmuls).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flamingo_composer.models.cross_attention import image_segments, media_text_time
from flamingo_composer.training.loss import count_supervised_tokens

FORWARD = 2  # FLOPs per weight per token, forward
ACTIVATION_GRAD = 2  # backward, gradient w.r.t. the input
WEIGHT_GRAD = 2  # backward, gradient w.r.t. the weight


def _own_matmul_weights(module: nn.Module) -> int:
    """Matmul weights a module holds itself: Linear / Conv weights (transformers' `Conv1D`, GPT-2's transposed
    Linear, too), fused attention in-projections, and stacked (E, ., .) expert matrices of fused MoE layers."""
    total = 0
    if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) or type(module).__name__ == "Conv1D":
        total += module.weight.numel()
    in_proj = getattr(module, "in_proj_weight", None)
    if isinstance(in_proj, torch.Tensor):
        total += in_proj.numel()
    total += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() == 3)
    return total


def _num_experts(experts: nn.Module) -> int | None:
    """E of a routed-experts container: a ModuleList of experts, or fused weights stacked along dim 0."""
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    stacked = [p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3]
    return stacked[0] if stacked else None


def matmul_weights(module: nn.Module | None, experts_per_token: int | None = None) -> float:
    """Weights used as matmul operands once per token.

    A mixture-of-experts layer routes each token to `experts_per_token` (top-k) of its E routed experts (a child
    named `experts`): those count k/E of their weights. Shared experts and the router count whole.
    """
    if module is None:
        return 0
    total: float = _own_matmul_weights(module)
    for name, child in module.named_children():
        count = matmul_weights(child, experts_per_token)
        num_experts = _num_experts(child) if name == "experts" and experts_per_token else None
        total += count * min(experts_per_token, num_experts) / num_experts if num_experts else count
    return total


def _attention_core(queries: int, keys: int, dim: int) -> int:
    """Forward FLOPs of softmax(QK^T)V for one sequence: two (q x d) @ (d x k) products."""
    return 2 * 2 * queries * keys * dim


def _requires_grad(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


@dataclass(frozen=True)
class AttentionShape:
    """Matmul weights of an attention block (+ its feed-forward) split by which tokens they multiply."""

    query_side: int  # weights applied to each query token (q, out projection, feed-forward)
    key_side: int  # weights applied to each key/value token (the kv projection)
    inner: int  # heads x dim_head


@dataclass(frozen=True)
class LMLayerShape:
    cross_attention: AttentionShape | None  # the gated block before this decoder layer
    decoder_weights: float  # matmul weights per token (MoE: the active experts' share)
    grad_below: bool  # a trainable parameter lies below: the frozen layer needs activation gradients


@dataclass(frozen=True)
class FlamingoFlops:
    """The numbers the FLOP count needs, read ONCE from the unwrapped model (FSDP later exposes only shards).

    `FlamingoFlops.of(model).per_batch(batch)` -> {dataset: training FLOPs of one per-rank batch}.
    """

    vision_per_image: float
    vision_tokens: int
    num_latents: int
    perceiver_layers: tuple[AttentionShape, ...]
    lm_layers: tuple[LMLayerShape, ...]
    lm_hidden: int
    head_weights: int
    head_grad: bool
    head_on_supervised_only: bool  # the training loss projects only the supervised positions (a head module)
    media_token_id: int
    cross_attention_per_image: bool  # each image's text attends to its own latents (else: all, behind a mask)

    @classmethod
    def of(cls, model: nn.Module) -> FlamingoFlops:
        from flamingo_composer.models.lm_adapter import get_decoder_layers, lm_hidden_size, text_config

        experts_per_token = getattr(text_config(model.lang_encoder), "num_experts_per_tok", None)

        perceiver_layers = tuple(
            AttentionShape(
                attn.to_q.weight.numel() + attn.to_out.weight.numel() + matmul_weights(ff),
                attn.to_kv.weight.numel(),
                attn.to_q.out_features,
            )
            for attn, ff in model.perceiver.layers
        )
        lm = model.lang_encoder
        grad_below = _requires_grad(lm.get_input_embeddings())  # trainable new-token rows need gradients through all
        lm_layers = []
        for layer in get_decoder_layers(lm):
            block = getattr(layer, "gated_cross_attn_layer", None)
            shape = None
            if block is not None:
                attn = block.attn
                shape = AttentionShape(
                    attn.to_q.weight.numel() + attn.to_out.weight.numel() + matmul_weights(block.ff),
                    attn.to_kv.weight.numel(),
                    attn.to_q.out_features,
                )
                grad_below = grad_below or _requires_grad(block)
            decoder_weights = matmul_weights(getattr(layer, "decoder_layer", layer), experts_per_token)
            lm_layers.append(LMLayerShape(shape, decoder_weights, grad_below))
        head = lm.get_output_embeddings()
        if head is None:  # tied head computed inside forward from the input embedding (MosaicGPT)
            head = lm.get_input_embeddings()
        return cls(
            vision_per_image=model.vision_shape.flops_per_image,
            vision_tokens=model.vision_shape.tokens,
            num_latents=int(model.perceiver.latents.shape[0]),
            perceiver_layers=perceiver_layers,
            lm_layers=tuple(lm_layers),
            lm_hidden=lm_hidden_size(lm),
            head_weights=head.weight.numel() if head is not None else 0,
            head_grad=grad_below,
            head_on_supervised_only=model.output_head is not None,
            media_token_id=int(model.media_token_id),
            cross_attention_per_image=any(getattr(m, "per_image", False) for m in model.modules()),
        )

    @staticmethod
    def _trained_attention(shape: AttentionShape, queries: int, keys: int, core: float | None = None) -> float:
        """Training FLOPs (6N per weight and token, attention core 3x) of a trainable attention block; `core`:
        its forward attention-core FLOPs when they are not one (queries x keys) attention."""
        weights_tokens = shape.query_side * queries + shape.key_side * keys
        core = _attention_core(queries, keys, shape.inner) if core is None else core
        return (FORWARD + ACTIVATION_GRAD + WEIGHT_GRAD) * weights_tokens + 3 * core

    def perceiver_per_image(self, media_tokens: int) -> float:
        """Resampling one image: latents attend to its tokens + the latents."""
        kv_tokens = media_tokens + self.num_latents
        return sum(self._trained_attention(s, self.num_latents, kv_tokens) for s in self.perceiver_layers)

    def head(self, positions: int) -> float:
        """The output projection at `positions` tokens (with its activation gradient when one is needed)."""
        return (FORWARD + (ACTIVATION_GRAD if self.head_grad else 0)) * self.head_weights * positions

    def lm_layers_per_sample(self, text_tokens: int, media_tokens: int, image_runs: int) -> float:
        """LM decoder layers (frozen) plus cross-attention blocks on one sequence of `text_tokens`.

        The per-image cross-attention core runs `image_runs` (T_img x the batch's longest run of one image's text,
        `cross_attention.image_segments`) queries against each image's `num_latents` latents; the masked one
        every token against all `media_tokens`.
        """
        flops = 0.0
        for layer in self.lm_layers:
            if layer.cross_attention is not None:
                inner = layer.cross_attention.inner
                core = (_attention_core(image_runs, self.num_latents, inner) if self.cross_attention_per_image
                        else _attention_core(text_tokens, media_tokens, inner))  # fmt: skip
                flops += self._trained_attention(layer.cross_attention, text_tokens, media_tokens, core)
            weight_passes = FORWARD + (ACTIVATION_GRAD if layer.grad_below else 0)
            flops += weight_passes * layer.decoder_weights * text_tokens
            flops += (3 if layer.grad_below else 1) * _attention_core(text_tokens, text_tokens, self.lm_hidden)
        return flops

    def _image_runs(self, input_ids: Any, t_img: int) -> int:
        """Queries of the per-image cross-attention core: T_img x the longest run of one image's text (what
        `image_segments` pads to); 0 for the masked form, which does not use it."""
        if not self.cross_attention_per_image:
            return 0
        _, valid = image_segments(media_text_time(torch.as_tensor(input_ids), self.media_token_id), t_img)
        return t_img * valid.shape[-1]  # valid: (B, T_img, S)

    def per_batch(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """{dataset: training FLOPs} of one per-rank batch `{name: sub}` (absent datasets omitted)."""
        flops: dict[str, float] = {}
        for name, sub in batch.items():
            if not isinstance(sub, Mapping) or "input_ids" not in sub:
                continue
            b, t_img = sub["image_mask"].shape  # (B, T_img)
            images = int(torch.as_tensor(sub["image_mask"]).sum())  # empty slots are neither encoded nor resampled
            vision = self.vision_per_image * images
            perceiver = self.perceiver_per_image(self.vision_tokens) * images
            text_tokens = sub["input_ids"].shape[1]
            runs = self._image_runs(sub["input_ids"], t_img)
            lm = self.lm_layers_per_sample(text_tokens, t_img * self.num_latents, runs) * b
            labels = sub.get("labels")
            if self.head_on_supervised_only and labels is not None:  # what the loss projects (recompute not counted)
                head = self.head(int(count_supervised_tokens(torch.as_tensor(labels))))
            else:
                head = self.head(text_tokens * b)
            flops[name] = float(vision + perceiver + lm + head)
        return flops


def flamingo_flops_per_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
    """{dataset: training FLOPs} of one per-rank batch, for an unwrapped model (see `FlamingoFlops`)."""
    return FlamingoFlops.of(model).per_batch(batch)
