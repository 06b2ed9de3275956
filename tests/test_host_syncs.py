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
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.loss import install_global_counts


def loader_form(batch: dict) -> dict:
    """The hand-built batch as the loader sends it: the real images only, uint8 (N, 3, H, W)."""
    for sub in batch.values():
        vision_x = sub.pop("vision_x")  # (B, T_img, 1, 3, H, W)
        real = vision_x[:, :, 0][sub["image_mask"]]  # (N, 3, H, W)
        sub["images"] = (real.clamp(-1, 1) * 127 + 128).to(torch.uint8)
    return batch


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
    batch = dual_batch(bundle.tokenizer)
    no_images = text_only_rows(bundle.tokenizer, dual_batch(bundle.tokenizer, mmc4_rows=2), slice(0, 2))
    assert not no_images["mmc4"]["image_mask"].any()
    for step in (loader_form(batch), loader_form(no_images)):
        recorded, losses = recorded_step(bundle.model, bundle, step)
        assert recorded == [], recorded
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_the_recorder_sees_the_syncs_of_the_padded_image_form():
    """What the recorder would flag: the reference's padded `vision_x` selects its images by boolean mask, and an
    attention mask passed to the LM is read back by transformers' mask builder."""
    bundle = build_flamingo(tiny_model_config("gpt_neox"))
    sub = dual_batch(bundle.tokenizer)["mmc4"]
    with HostSyncRecorder() as recorder:
        bundle.model(sub["vision_x"], sub["input_ids"], sub["attention_mask"], image_mask=sub["image_mask"])
    ops = {op for op, _ in recorder.ops}
    assert "index" in ops and "_local_scalar_dense" in ops and "nonzero" in ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_host_indices_of_a_pinned_batch_are_pinned():
    """A pageable host tensor's copy to the GPU waits for the device: the host's indices follow the batch's pinning."""
    from flamingo_composer.data.host_indices import IMAGE_SLOTS, SUPERVISED_POSITIONS

    bundle = build_flamingo(tiny_model_config("gpt_neox"))
    batch = loader_form(dual_batch(bundle.tokenizer))
    pinned = {name: {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in sub.items()}
              for name, sub in batch.items()}  # fmt: skip
    for microbatch in split_batch(pinned, 2):
        for sub in microbatch.values():
            assert sub[IMAGE_SLOTS].is_pinned() and sub[SUPERVISED_POSITIONS].is_pinned()
