"""Vision towers behind one interface: images (N, 3, H, W) -> patch tokens (N, n_tokens, width), frozen.

Three kinds of tower, each read by a small adapter picked by the module's type:
- open_clip's own `VisionTransformer` (the released models' ViT-L/14): the trunk's patch tokens, CLS dropped,
  before `proj`. The released OpenFlamingo models were trained with open_clip 2.16-2.22, whose `output_tokens`
  came *without* the final `ln_post`; open_clip >= 2.23 applies it unless the module's `final_ln_after_pool` is
  set. We set that flag (and `output_tokens`), so any ViT yields exactly those tokens through its own forward
  (`ln_post_on_tokens: true` keeps `ln_post`).
- open_clip's timm towers (`TimmModel`: SigLIP, SigLIP2, EVA01/02, PE-Core, ViTamin, ConvNeXt, MobileCLIP, ...):
  `trunk.forward_features`, prefix tokens (class / register tokens) dropped, conv maps (N, C, h, w) flattened to
  (N, h*w, C).
- a transformers vision model (`SiglipVisionModel`, `CLIPVisionModel`, ...): `last_hidden_state`, with the
  tokens beyond the patch grid (CLIP's class token) dropped.
The module itself stays as its library built it, so its parameter names are its checkpoints'. Its token shape and
forward FLOPs are measured once on one image with fake tensors (no compute, no memory; meta weights work too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flamingo_composer.flop_formulas import count_flops


class TowerAdapter:
    """How to read one kind of vision tower. Subclasses are stateless: every method takes the tower module."""

    name = ""

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def prepare(visual: nn.Module, ln_post_on_tokens: bool) -> None:
        """Check the tower yields per-patch tokens and set it up to return them (raise ValueError otherwise)."""
        if ln_post_on_tokens:
            raise ValueError("vision.ln_post_on_tokens applies to open_clip's own ViTs only")

    @staticmethod
    def tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> (N, n_tokens, width)."""
        raise NotImplementedError

    @staticmethod
    def blocks(visual: nn.Module) -> list[nn.Module]:
        """The tower's repeated blocks (FSDP units)."""
        raise NotImplementedError

    @staticmethod
    def image_size(visual: nn.Module) -> tuple[int, int]:
        raise NotImplementedError


class OpenClipViT(TowerAdapter):
    name = "open_clip VisionTransformer"

    @staticmethod
    def matches(visual):
        from open_clip.transformer import VisionTransformer

        return isinstance(visual, VisionTransformer)

    @staticmethod
    def prepare(visual, ln_post_on_tokens):
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise ValueError(
                "open_clip vision config with an attentional pooler or pool_type 'none' is not supported: "
                "its tokens are not per-patch trunk outputs"
            )
        visual.output_tokens = True
        visual.final_ln_after_pool = not ln_post_on_tokens

    @staticmethod
    def tokens(visual, images):
        _, tokens = visual(images)  # (N, v, D), CLS dropped
        return tokens

    @staticmethod
    def blocks(visual):
        return list(visual.transformer.resblocks)

    @staticmethod
    def image_size(visual):
        return tuple(visual.image_size)


class OpenClipTimm(TowerAdapter):
    name = "open_clip TimmModel"

    @staticmethod
    def matches(visual):
        from open_clip.timm_model import TimmModel

        return isinstance(visual, TimmModel)

    @staticmethod
    def prepare(visual, ln_post_on_tokens):
        TowerAdapter.prepare(visual, ln_post_on_tokens)
        if not callable(getattr(visual.trunk, "forward_features", None)):
            raise ValueError(f"timm trunk {type(visual.trunk).__name__} has no forward_features")

    @staticmethod
    def tokens(visual, images):
        trunk = visual.trunk
        features = trunk.forward_features(images)
        if features.dim() == 4:  # a conv map: (N, C, h, w), or (N, h, w, C) for channels-last trunks
            if features.shape[1] != trunk.num_features and features.shape[-1] == trunk.num_features:
                return features.flatten(1, 2)  # (N, h*w, C)
            return features.flatten(2).transpose(1, 2)  # (N, h*w, C)
        return features[:, getattr(trunk, "num_prefix_tokens", 0) :]  # (N, patches, D)

    @staticmethod
    def blocks(visual):
        trunk = visual.trunk
        if isinstance(getattr(trunk, "blocks", None), nn.Sequential | nn.ModuleList):
            return list(trunk.blocks)
        stages = getattr(trunk, "stages", None)
        if isinstance(stages, nn.Sequential | nn.ModuleList):
            inner = [list(stage.blocks) for stage in stages if isinstance(getattr(stage, "blocks", None), nn.Module)]
            return [block for stage_blocks in inner for block in stage_blocks] or list(stages)
        return []

    @staticmethod
    def image_size(visual):
        patch_embed = getattr(visual.trunk, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None) or visual.image_size
        return tuple(size)


class TransformersVision(TowerAdapter):
    name = "transformers vision model"

    @staticmethod
    def matches(visual):
        from transformers import PreTrainedModel

        return isinstance(visual, PreTrainedModel) and hasattr(visual.config, "image_size")

    @staticmethod
    def tokens(visual, images):
        hidden = visual(pixel_values=images).last_hidden_state  # (N, T, D)
        config = visual.config
        height, width = TransformersVision.image_size(visual)
        patches = (height // config.patch_size) * (width // config.patch_size)
        return hidden[:, hidden.shape[1] - patches :]  # (N, patches, D): class / register tokens dropped

    @staticmethod
    def blocks(visual):
        count = visual.config.num_hidden_layers
        lists = [m for m in visual.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
        return list(lists[0]) if len(lists) == 1 else []

    @staticmethod
    def image_size(visual):
        size = visual.config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)


TOWER_ADAPTERS: tuple[type[TowerAdapter], ...] = (OpenClipViT, OpenClipTimm, TransformersVision)


def tower_adapter(visual: nn.Module) -> type[TowerAdapter]:
    """The adapter of `visual`; ValueError naming its class and the supported kinds otherwise."""
    for adapter in TOWER_ADAPTERS:
        if adapter.matches(visual):
            return adapter
    kinds = ", ".join(adapter.name for adapter in TOWER_ADAPTERS)
    raise ValueError(f"vision encoder {type(visual).__name__} is not a supported tower ({kinds})")


@dataclass(frozen=True)
class TowerShape:
    """What one image costs and gives: its patch tokens' count and width, and the tower's forward FLOPs."""

    tokens: int
    width: int
    flops_per_image: float


def measure_tower(visual: nn.Module) -> TowerShape:
    """The tower's output shape and forward FLOPs on one image, counted with fake tensors (no compute)."""
    adapter = tower_adapter(visual)
    height, width = adapter.image_size(visual)
    reference = next(visual.parameters())
    shape, flops = count_flops(
        lambda images: adapter.tokens(visual, images), (1, 3, height, width), reference.device, reference.dtype
    )
    if len(shape) != 3:
        raise ValueError(f"vision encoder {type(visual).__name__} gave tokens of shape {tuple(shape)}, not (N, T, D)")
    return TowerShape(tokens=int(shape[1]), width=int(shape[2]), flops_per_image=float(flops))


def prepare_vision(visual: nn.Module, ln_post_on_tokens: bool = False) -> nn.Module:
    """Check and set up `visual` to give patch tokens, frozen and in eval mode (it is never trained)."""
    tower_adapter(visual).prepare(visual, ln_post_on_tokens)
    visual.requires_grad_(False)
    return visual.eval()


def vision_block_classes(visual: nn.Module) -> tuple[type[nn.Module], ...]:
    """Classes of the tower's repeated blocks (FSDP units), in order of first appearance."""
    return tuple(dict.fromkeys(type(block) for block in tower_adapter(visual).blocks(visual)))


def vision_image_size(visual: nn.Module) -> tuple[int, int]:
    """(H, W) of the images the tower takes."""
    return tower_adapter(visual).image_size(visual)


@torch.no_grad()
def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) -> patch tokens (N, v, D) of the frozen tower, without autograd."""
    adapter = tower_adapter(visual)
    if images.shape[0] == 0:
        # No image on this rank: still run the tower, on one blank image whose tokens are dropped. Under FSDP the
        # other ranks wait in this module's all-gathers, so every rank must make the same calls (towers cannot
        # run on an empty batch).
        return adapter.tokens(visual, images.new_zeros(1, *images.shape[1:]))[:0]  # (0, v, D)
    return adapter.tokens(visual, images)  # (N, v, D)
