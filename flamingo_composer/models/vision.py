"""open_clip vision tower -> patch tokens, with the released checkpoints' semantics (no ln_post by default).

The released OpenFlamingo models were trained with open_clip 2.16-2.22, whose `output_tokens` were the trunk's
patch tokens (CLS dropped, before `proj`) *without* the final `ln_post`; open_clip >= 2.23 applies `ln_post` to
them unless the module's `final_ln_after_pool` is set. We set that flag (and `output_tokens`) on the module, so
any ViT (hub models included) yields exactly those tokens through its own forward (hooks and FSDP wrapping of
the tower keep working). For CLS pooling the flag does not change the pooled output, which we ignore anyway.
"""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import nn


def check_vision_transformer(visual: nn.Module) -> VisionTransformer:
    """Only open_clip's VisionTransformer with a CLS token and no attentional pooler yields Flamingo patch tokens."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"vision encoder {type(visual).__name__} is not an open_clip VisionTransformer; "
            "Flamingo needs ViT patch tokens (e.g. ViT-L-14)"
        )
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise ValueError(
            "open_clip vision config with an attentional pooler or pool_type 'none' is not supported: "
            "its tokens are not per-patch trunk outputs"
        )
    return visual


def use_patch_token_semantics(visual: nn.Module, ln_post_on_tokens: bool = False) -> nn.Module:
    """Make `visual(images)` return (pooled, patch tokens); tokens get `ln_post` only if asked."""
    vit = check_vision_transformer(visual)
    vit.output_tokens = True
    vit.final_ln_after_pool = not ln_post_on_tokens
    return vit


def vision_width(visual: nn.Module) -> int:
    """Width D of the patch tokens (the ViT width, before `proj`)."""
    return int(check_vision_transformer(visual).transformer.width)


def vision_block_class(visual: nn.Module) -> type[nn.Module]:
    """Class of the ViT's residual blocks (an FSDP / checkpointing unit)."""
    return type(check_vision_transformer(visual).transformer.resblocks[0])


@torch.no_grad()
def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) -> patch tokens (N, v, D) of the frozen ViT, without autograd.

    `visual` must have been set up by `use_patch_token_semantics`.
    """
    if not getattr(visual, "output_tokens", False):
        raise ValueError("vision encoder does not output tokens: call use_patch_token_semantics first")
    if images.shape[0] == 0:
        # No image on this rank: still run the tower, on one blank image whose tokens are dropped. Under FSDP the
        # other ranks wait in this module's all-gathers, so every rank must make the same calls (open_clip cannot
        # run on an empty batch).
        _, tokens = visual(images.new_zeros(1, *images.shape[1:]))  # (1, v, D)
        return tokens[:0]  # (0, v, D)
    _, tokens = visual(images)  # (N, v, D), CLS dropped
    return tokens


def freeze_vision(visual: nn.Module) -> nn.Module:
    """Freeze all parameters and put the tower in eval mode (it is never trained)."""
    visual.requires_grad_(False)
    return visual.eval()
