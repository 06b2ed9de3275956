"""Frozen-aware FLOP count of one Flamingo training step, per dataset (for SpeedMonitor's MFU and tools/bench.py).

A matmul with N weights costs 2N FLOPs per token forward. Backward costs another 2N for the activation gradient
and 2N for the weight gradient, but frozen parts skip the weight gradient:
- vision encoder (frozen, no autograd): forward only, 2N per token of each image actually encoded;
- perceiver and gated cross-attention blocks (trainable): 6N per token they process;
- LM decoder layers and head (frozen): 2N forward + 2N activation gradient per text token where a trainable
  parameter lies below them (the new-token embedding rows, or a cross-attention block), else 2N;
- attention score/value products (no weights): 4*q*k*d forward, twice that backward when gradients pass.
Norms, biases, activations and embedding look-ups are ignored (they are not matmuls).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

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


def _vision_flops_per_image(visual: nn.Module) -> float:
    """Forward FLOPs of encoding one image with an open_clip VisionTransformer (CLS + patch tokens)."""
    vit = _find(visual, "VisionTransformer")
    vit = vit[0] if vit else visual
    grid_h, grid_w = vit.grid_size
    seq = 1 + grid_h * grid_w
    width = vit.transformer.width
    layers = len(vit.transformer.resblocks)
    conv = vit.conv1.weight.numel() * grid_h * grid_w  # patchify: one matmul per patch
    body = matmul_weights(vit.transformer) * seq
    return FORWARD * (conv + body) + layers * _attention_core(seq, seq, width)


def _vision_tokens_per_image(visual: nn.Module) -> int:
    vit = _find(visual, "VisionTransformer")
    vit = vit[0] if vit else visual
    grid_h, grid_w = vit.grid_size
    return grid_h * grid_w


def _perceiver_flops_per_image(perceiver: nn.Module, media_tokens: int) -> float:
    """Training FLOPs (6N, attention 3x) of resampling one image: latents attend to its tokens + latents."""
    n_latents = perceiver.latents.shape[0]
    flops = 0.0
    for attn, ff in perceiver.layers:
        inner = attn.to_q.out_features
        kv_tokens = media_tokens + n_latents
        weights_tokens = (
            (attn.to_q.weight.numel() + attn.to_out.weight.numel() + matmul_weights(ff)) * n_latents
            + attn.to_kv.weight.numel() * kv_tokens
        )
        flops += (FORWARD + ACTIVATION_GRAD + WEIGHT_GRAD) * weights_tokens
        flops += 3 * _attention_core(n_latents, kv_tokens, inner)
    return flops


def _xattn_flops_per_sample(block: nn.Module, text_tokens: int, media_tokens: int) -> float:
    """Training FLOPs of one gated cross-attention block on one sequence (trainable: 6N, attention 3x)."""
    attn = block.attn
    inner = attn.to_q.out_features
    weights_tokens = (
        (attn.to_q.weight.numel() + attn.to_out.weight.numel() + matmul_weights(block.ff)) * text_tokens
        + attn.to_kv.weight.numel() * media_tokens
    )
    return (FORWARD + ACTIVATION_GRAD + WEIGHT_GRAD) * weights_tokens + 3 * _attention_core(
        text_tokens, media_tokens, inner
    )


def _requires_grad(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _lm_flops_per_sample(model: nn.Module, text_tokens: int, media_tokens: int) -> float:
    """LM (frozen layers and head) plus cross-attention blocks on one sequence of `text_tokens`."""
    from flamingo_composer.models.lm_adapter import get_decoder_layers, lm_hidden_size

    lm = model.lang_encoder
    hidden = lm_hidden_size(lm)
    grad_below = _requires_grad(lm.get_input_embeddings())  # trainable new-token rows need gradients through all
    flops = 0.0
    for layer in get_decoder_layers(lm):
        block = getattr(layer, "gated_cross_attn_layer", None)
        decoder_layer = getattr(layer, "decoder_layer", layer)
        if block is not None:
            flops += _xattn_flops_per_sample(block, text_tokens, media_tokens)
            grad_below = grad_below or _requires_grad(block)
        weight_passes = FORWARD + (ACTIVATION_GRAD if grad_below else 0)
        attention_passes = 3 if grad_below else 1
        flops += weight_passes * matmul_weights(decoder_layer) * text_tokens
        flops += attention_passes * _attention_core(text_tokens, text_tokens, hidden)
    head = lm.get_output_embeddings()
    if head is None:  # tied head computed inside forward from the input embedding (MosaicGPT)
        head = lm.get_input_embeddings()
    head_weights = head.weight.numel() if head is not None else 0
    flops += (FORWARD + (ACTIVATION_GRAD if grad_below else 0)) * head_weights * text_tokens
    return flops


def _images_encoded(sub: Mapping[str, Any]) -> int:
    """Image slots that hold an image: the image mask, or non-zero slots when none is given."""
    image_mask = sub.get("image_mask")
    if image_mask is not None:
        return int(torch.as_tensor(image_mask).sum())
    vision_x = sub["vision_x"]  # (B, T_img, F, C, H, W)
    return int((vision_x.flatten(2).abs().sum(-1) > 0).sum())


def flamingo_flops_per_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
    """{dataset: training FLOPs} of one per-rank batch `{'laion': sub, 'mmc4': sub}` (absent datasets omitted)."""
    flops: dict[str, float] = {}
    v_tokens = _vision_tokens_per_image(model.vision_encoder)
    n_latents = model.perceiver.latents.shape[0]
    for name, sub in batch.items():
        if not isinstance(sub, Mapping) or "input_ids" not in sub:
            continue
        b, t_img, frames = sub["vision_x"].shape[:3]  # (B, T_img, F, C, H, W)
        text_tokens = sub["input_ids"].shape[1]
        images = _images_encoded(sub)  # empty slots are neither encoded nor resampled
        vision = _vision_flops_per_image(model.vision_encoder) * images * frames
        perceiver = _perceiver_flops_per_image(model.perceiver, v_tokens * frames) * images
        lm = _lm_flops_per_sample(model, text_tokens, t_img * n_latents) * b
        flops[name] = float(vision + perceiver + lm)
    return flops
