"""Vision towers behind one interface: open_clip ViTs, open_clip timm towers (SigLIP2, EVA02, ConvNeXt shapes and
real configs on the meta device), transformers vision models; their tokens, transforms, FSDP units, and a
training step through each."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from step_utils import dual_batch, set_gates, step_losses

from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.models import build_flamingo, tiny_model_config
from flamingo_composer.models.towers import VisionConfig, build_vision
from flamingo_composer.models.vision import measure_tower, patch_tokens, prepare_vision, vision_block_classes
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.fsdp import install_fsdp_policies, simulate_fsdp_units

# tiny tower -> (its blocks' class, what its tokens are, from the module's own outputs)
TINY_TOWERS = {
    "tiny-vit": ("ResidualAttentionBlock", None),  # open_clip's ViT: tested against its trunk in test_model_flamingo
    "tiny-siglip2": ("Block", lambda v, x: v.trunk.forward_features(x)),  # no prefix token
    "tiny-eva02": ("EvaBlock", lambda v, x: v.trunk.forward_features(x)[:, 1:]),  # the class token dropped
    "tiny-convnext": ("ConvNeXtBlock", lambda v, x: v.trunk.forward_features(x).flatten(2).transpose(1, 2)),
    "tiny-hf-siglip": ("SiglipEncoderLayer", lambda v, x: v(pixel_values=x).last_hidden_state),
    "tiny-hf-clip": ("CLIPEncoderLayer", lambda v, x: v(pixel_values=x).last_hidden_state[:, 1:]),
}


@pytest.mark.parametrize("tower", list(TINY_TOWERS))
def test_each_tower_gives_patch_tokens_and_trains_the_model_above_it(tower):
    block_name, expected_tokens = TINY_TOWERS[tower]
    bundle = build_flamingo(tiny_model_config("llama", vision=tower))
    model = bundle.model
    assert (model.vision_shape.tokens, model.vision_shape.width, model.vis_dim) == (16, 64, 64)
    assert [c.__name__ for c in model.vision_block_classes] == [block_name]
    assert not model.vision_encoder.training and not any(p.requires_grad for p in model.vision_encoder.parameters())

    images = torch.randn(3, 3, 32, 32)
    tokens = patch_tokens(model.vision_encoder, images)
    assert tokens.shape == (3, 16, 64) and not tokens.requires_grad
    if expected_tokens is not None:
        with torch.no_grad():
            torch.testing.assert_close(tokens, expected_tokens(model.vision_encoder, images))
    assert patch_tokens(model.vision_encoder, images[:0]).shape == (0, 16, 64)

    # Its own preprocessing, split for uint8 workers.
    split = SplitImageTransform.of(bundle.image_transform)
    assert split.to_uint8(Image.new("RGB", (48, 40), (200, 10, 10))).shape == (3, 32, 32)

    set_gates(model, 0.5)
    composer_model = FlamingoComposerModel(model)
    batch = dual_batch(bundle.tokenizer)
    step_losses(composer_model, batch)["total"].backward()
    assert model.perceiver.latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_encoder.parameters())

    install_fsdp_policies(composer_model)
    units = simulate_fsdp_units(model)
    tower_units = [name for name in units if name.startswith("vision_encoder.")]
    assert len(tower_units) == sum(type(m).__name__ == block_name for m in model.vision_encoder.modules()) > 0


def test_the_images_reach_the_language_model_through_each_kind_of_tower():
    for tower in ("tiny-siglip2", "tiny-hf-clip"):
        bundle = build_flamingo(tiny_model_config("qwen3", vision=tower))
        model = bundle.model.eval()
        set_gates(model, 1.0)
        ids = bundle.tokenizer(["<image> a red circle"], return_tensors="pt").input_ids
        with torch.no_grad():
            a = model(torch.randn(1, 3, 32, 32), torch.ones(1, 1, dtype=torch.bool), ids).logits
            b = model(torch.randn(1, 3, 32, 32), torch.ones(1, 1, dtype=torch.bool), ids).logits
        assert (a - b).abs().max() > 1e-4, tower


def test_a_transformers_tower_takes_its_image_processor_settings():
    _, siglip = build_vision(tiny_model_config(vision="tiny-hf-siglip").vision)
    names = [type(step).__name__ for step in siglip.transforms]
    assert names == ["Resize", "ToTensor", "Normalize"] and siglip.transforms[-1].mean == [0.5, 0.5, 0.5]
    assert siglip.transforms[0].size == (32, 32)  # SigLIP squashes to the square
    _, clip = build_vision(tiny_model_config(vision="tiny-hf-clip").vision)
    names = [type(step).__name__ for step in clip.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]  # CLIP: shortest edge, then a center crop
    assert clip.transforms[-1].mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


# Real open_clip tower configs, built on the meta device (no weights, nothing downloaded): name -> tokens, width.
REAL_TOWERS = {
    "PE-Core-T-16-384": (576, 192),
    "ViTamin-S": (196, 384),
    "convnext_tiny": (49, 768),
    "MobileCLIP2-S0": (64, 1024),
}


@pytest.mark.parametrize("name", list(REAL_TOWERS))
def test_real_open_clip_timm_towers_give_their_patch_grid(name):
    tower, _ = build_vision(VisionConfig(name=name), on_meta=True)
    shape = measure_tower(prepare_vision(tower))
    assert (shape.tokens, shape.width) == REAL_TOWERS[name]
    assert shape.flops_per_image > 1e9 and vision_block_classes(tower)


@pytest.mark.parametrize(("name", "why"), [("RN50", "ModifiedResNet is not a supported tower"),
                                           ("coca_ViT-B-32", "attentional pooler")])  # fmt: skip
def test_towers_without_patch_tokens_are_refused_by_name(name, why):
    tower, _ = build_vision(VisionConfig(name=name), on_meta=True)
    with pytest.raises(ValueError, match=why):
        prepare_vision(tower)
