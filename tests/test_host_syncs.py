"""A training step reads nothing back from the device: the DataSpec's device transform, the ComposerModel's
forward, the loss and backward run no op whose output shape depends on the data or that reads a value to the host
(tests/host_syncs.py), for both datasets, both cross-attention forms and a microbatch without images. On a GPU each
such op is a synchronisation that stalls the step; the host computes those indices instead (data/host_indices.py).
"""

from __future__ import annotations

import pytest
import torch
from host_syncs import HostSyncRecorder
from step_utils import dual_batch, set_gates, text_only_rows

from flamingo_composer.data.dataspec import NormalizeImages, split_batch
from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.models import build_flamingo, tiny_model_config
from flamingo_composer.models.reference_images import compact_images, padded_vision_x
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.loss import install_global_counts


def recorded_step(model, bundle, batch: dict) -> tuple[list, dict]:
    """One optimizer step's microbatches (host split, then transform, forward, loss, backward under the
    recorder), as Composer runs them; the ops recorded and the losses."""
    composer_model = FlamingoComposerModel(model).train()
    normalize = NormalizeImages(SplitImageTransform.of(bundle.image_transform))
    install_global_counts(batch)
    recorded, losses = [], {}
    for microbatch in split_batch(batch, 2):
        with HostSyncRecorder() as recorder:
            microbatch = normalize(microbatch)
            loss = composer_model.loss(composer_model(microbatch), microbatch)
            loss["total"].backward()
        recorded += recorder.ops
        losses.update({name: float(loss[name]) for name in microbatch})
    return recorded, losses


CASES = [("gpt_neox", "per_image"), ("gpt_neox", "masked"), ("llama", "per_image")]


@pytest.mark.parametrize(("family", "form"), CASES)
def test_a_training_step_makes_no_host_sync(family, form):
    bundle = build_flamingo(tiny_model_config(family, cross_attention=form))
    set_gates(bundle.model, 0.5)
    batch = dual_batch(bundle.tokenizer, float_images=False)  # the loader's form: uint8 images
    no_images = text_only_rows(bundle.tokenizer, dual_batch(bundle.tokenizer, float_images=False), slice(0, 2))
    assert not no_images["mmc4"]["image_mask"].any() and len(no_images["mmc4"]["images"]) == 0
    for step in (batch, no_images):
        recorded, losses = recorded_step(bundle.model, bundle, step)
        assert recorded == [], recorded
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_the_recorder_sees_the_syncs_the_training_path_avoids():
    """What the recorder flags: the reference's padded `vision_x` made compact (boolean-mask indexing), image slots
    read from the mask (the evaluation path's `nonzero`), and an attention mask passed to the LM (read back by
    transformers' mask builder)."""
    bundle = build_flamingo(tiny_model_config("gpt_neox"))
    sub = dual_batch(bundle.tokenizer)["mmc4"]
    vision_x = padded_vision_x(sub["images"], sub["image_mask"])  # (B, T_img, 1, 3, H, W)
    with HostSyncRecorder() as recorder:
        images, image_mask = compact_images(vision_x, sub["image_mask"])
        bundle.model(images, image_mask, sub["input_ids"], sub["attention_mask"])
    ops = {op for op, _ in recorder.ops}
    assert "index" in ops and "_local_scalar_dense" in ops and "nonzero" in ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_host_indices_of_a_pinned_batch_are_pinned():
    """A pageable host tensor's copy to the GPU waits for the device: the host's indices follow the batch's pinning."""
    from flamingo_composer.data.host_indices import IMAGE_SLOTS, SUPERVISED_POSITIONS

    bundle = build_flamingo(tiny_model_config("gpt_neox"))
    batch = dual_batch(bundle.tokenizer, float_images=False)
    pinned = {name: {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in sub.items()}
              for name, sub in batch.items()}  # fmt: skip
    for microbatch in split_batch(pinned, 2):
        for sub in microbatch.values():
            assert sub[IMAGE_SLOTS].is_pinned() and sub[SUPERVISED_POSITIONS].is_pinned()
