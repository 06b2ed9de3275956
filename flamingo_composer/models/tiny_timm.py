"""Tiny timm trunks of current vision-tower shapes, registered with timm under `flamingo_tiny_*` on import.

open_clip builds its timm towers by model name (`vision_cfg.timm_model_name`) and takes no size arguments, so
tests and the built-in tiny configs name these: each is timm's own architecture (SigLIP2's class-token-free ViT with
an attention pool, EVA02's rotary SwiGLU ViT, ConvNeXt) at 32 px with 16 patch tokens of width 64.
`models/towers.py` imports this module before open_clip builds anything, so every process knows the names.
"""

from __future__ import annotations

from timm.models import convnext, eva, register_model, vision_transformer

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


@register_model
def flamingo_tiny_siglip2(pretrained: bool = False, **kwargs):
    """SigLIP2's trunk shape (no class token, MAP pool): 4x4 patches of width 64."""
    return vision_transformer.vit_base_patch16_siglip_224(pretrained=False, **{**TINY_VIT, **kwargs})


@register_model
def flamingo_tiny_eva02(pretrained: bool = False, **kwargs):
    """EVA02-CLIP's trunk shape (class token, rotary position embedding, SwiGLU): 4x4 patches of width 64."""
    return eva.eva02_base_patch16_clip_224(pretrained=False, **{**TINY_VIT, "ref_feat_shape": (4, 4), **kwargs})


@register_model
def flamingo_tiny_convnext(pretrained: bool = False, **kwargs):
    """ConvNeXt's four stages, one block each, with a stride-1 stem: a 4x4 map of 64 channels at 32 px."""
    tiny = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "patch_size": 1}
    return convnext.convnext_atto(pretrained=False, **{**tiny, **kwargs})
