"""Frozen-aware FLOP count of one Flamingo training step, per dataset (for SpeedMonitor's MFU and tools/bench.py).

A matmul with N weights costs 2N FLOPs per token forward. Backward costs another 2N for the activation gradient
and 2N for the weight gradient, but frozen parts skip the weight gradient:
- vision encoder (frozen, no autograd): forward only, 2N per token of each image actually encoded;
- perceiver and gated cross-attention blocks (trainable): 6N per token they process;
- LM decoder layers and head (frozen): 2N forward + 2N activation gradient per text token where a trainable
  parameter lies below them (the new-token embedding rows, or a cross-attention block), else 2N; the head only at
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

FORWARD = 2  # FLOPs per weight per token, forward
ACTIVATION_GRAD = 2  # backward, gradient w.r.t. the input
WEIGHT_GRAD = 2  # backward, gradient w.r.t. the weight


def matmul_weights(module: nn.Module | None) -> int:
    """Weights used as matmul operands once per token: Linear / Conv weights and fused attention in-projections.

    transformers' `Conv1D` (GPT-2's linear layer with a transposed weight) counts as a Linear.
    """
    if module is None:
        return 0
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Conv1d | nn.Conv2d) or type(sub).__name__ == "Conv1D":
            total += sub.weight.numel()
        in_proj = getattr(sub, "in_proj_weight", None)
        if isinstance(in_proj, torch.Tensor):
            total += in_proj.numel()
    return total


def _attention_core(queries: int, keys: int, dim: int) -> int:
    """Forward FLOPs of softmax(QK^T)V for one sequence: two (q x d) @ (d x k) products."""
    return 2 * 2 * queries * keys * dim


def _find(module: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__ == class_name]


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
    decoder_weights: int
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
        from flamingo_composer.models.lm_adapter import get_decoder_layers, lm_hidden_size

        vit = _find(model.vision_encoder, "VisionTransformer")
        vit = vit[0] if vit else model.vision_encoder
        grid_h, grid_w = vit.grid_size
        seq = 1 + grid_h * grid_w  # CLS + patch tokens
        vision = FORWARD * (vit.conv1.weight.numel() * grid_h * grid_w + matmul_weights(vit.transformer) * seq)
        vision += len(vit.transformer.resblocks) * _attention_core(seq, seq, vit.transformer.width)

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
            lm_layers.append(LMLayerShape(shape, matmul_weights(getattr(layer, "decoder_layer", layer)), grad_below))
        head = lm.get_output_embeddings()
        if head is None:  # tied head computed inside forward from the input embedding (MosaicGPT)
            head = lm.get_input_embeddings()
        return cls(
            vision_per_image=float(vision),
            vision_tokens=grid_h * grid_w,
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
        """{dataset: training FLOPs} of one per-rank batch `{'laion': sub, 'mmc4': sub}` (absent datasets omitted)."""
        flops: dict[str, float] = {}
        for name, sub in batch.items():
            if not isinstance(sub, Mapping) or "input_ids" not in sub:
                continue
            if "vision_x" in sub:
                b, t_img, frames = sub["vision_x"].shape[:3]  # (B, T_img, F, C, H, W)
            else:  # the loader's compact form: uint8 images of the real slots, one frame each
                (b, t_img), frames = sub["image_mask"].shape, 1  # (B, T_img)
            images = _images_encoded(sub)  # empty slots are neither encoded nor resampled
            vision = self.vision_per_image * images * frames
            perceiver = self.perceiver_per_image(self.vision_tokens * frames) * images
            text_tokens = sub["input_ids"].shape[1]
            runs = self._image_runs(sub["input_ids"], t_img)
            lm = self.lm_layers_per_sample(text_tokens, t_img * self.num_latents, runs) * b
            labels = sub.get("labels")
            if self.head_on_supervised_only and labels is not None:  # what the loss projects (recompute not counted)
                head = self.head(int((torch.as_tensor(labels)[:, 1:] != -100).sum()))
            else:
                head = self.head(text_tokens * b)
            flops[name] = float(vision + perceiver + lm + head)
        return flops


def _images_encoded(sub: Mapping[str, Any]) -> int:
    """Image slots that hold an image: the image mask, or non-zero slots when none is given."""
    image_mask = sub.get("image_mask")
    if image_mask is not None:
        return int(torch.as_tensor(image_mask).sum())
    vision_x = sub["vision_x"]  # (B, T_img, F, C, H, W)
    return int((vision_x.flatten(2).abs().sum(-1) > 0).sum())


def flamingo_flops_per_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
    """{dataset: training FLOPs} of one per-rank batch, for an unwrapped model (see `FlamingoFlops`)."""
    return FlamingoFlops.of(model).per_batch(batch)
