"""bf16 steps on CPU: the real training step (the ComposerModel's forward, the fused CE, per-image and masked
cross-attention, the GELU recompute, backward, the fused AdamW step) and generation under
`torch.autocast("cpu", dtype=torch.bfloat16)`, with the frozen weights in fp32 or in bf16 (`frozen_dtype`).

Composer refuses amp precisions on CPU, but torch runs bf16 autocast here, so everything except the device is what
an amp_bf16 GPU run executes. Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4% per value);
the loss is an fp32 mean over ~100 token CEs whose rounding errors are independent, so it stays well within 1% of
the fp32 loss (measured: under 0.02%); a gradient tensor sums many such terms, so its direction barely moves:
cosine > 0.99 against fp32 (measured: > 0.9998).
"""

from __future__ import annotations

import copy

import pytest
import torch
from step_utils import dual_batch, full_images, set_gates, step_losses

from flamingo_composer.models import build_flamingo, tiny_model_config
from flamingo_composer.models.factory import cast_frozen_weights
from flamingo_composer.training.builders import build_optimizer
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.config import OptimizerConfig

CASES = [("gpt_neox", "per_image"), ("gpt_neox", "masked"), ("llama", "per_image"), ("mpt", "per_image"),
         ("qwen3", "masked"), ("gemma3_text", "per_image")]  # fmt: skip


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _step(model, batch, *, autocast: bool):
    """One step's losses and the trainable gradients (loss and backward under autocast when asked)."""
    composer_model = FlamingoComposerModel(model).train()
    with bf16_autocast() if autocast else torch.autocast("cpu", enabled=False):
        losses = step_losses(composer_model, batch)
    losses["total"].backward()
    return losses, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("family", "cross_attention"), CASES)
def test_a_bf16_training_step_matches_fp32_and_keeps_the_trained_weights_fp32(family, cross_attention, frozen_dtype):
    bundle = build_flamingo(tiny_model_config(family, cross_attention=cross_attention))
    set_gates(bundle.model, 0.5)
    batch = dual_batch(bundle.tokenizer)
    fp32_losses, fp32_grads = _step(copy.deepcopy(bundle.model), batch, autocast=False)

    model = copy.deepcopy(bundle.model)
    if frozen_dtype == "bfloat16":
        cast_frozen_weights(model, torch.bfloat16)
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    losses, grads = _step(model, batch, autocast=True)
    for name in ("laion", "mmc4", "total"):
        assert losses[name].dtype == torch.float32  # the CE is taken in fp32 from bf16 logits
        assert abs(losses[name].item() - fp32_losses[name].item()) <= 1e-2 * fp32_losses[name].item(), name
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        reference = fp32_grads[name]
        if reference.norm() > 0:
            cosine = torch.nn.functional.cosine_similarity(grad.flatten().double(), reference.flatten().double(), 0)
            assert cosine > 0.99, (name, cosine.item())

    optimizer = build_optimizer(OptimizerConfig(lr=1e-3), model)  # torch's fused AdamW
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and torch.isfinite(param).all(), name
            assert not torch.equal(param, before[name]), name


@pytest.mark.parametrize("family", ["gpt_neox", "mpt", "qwen3"])
def test_generation_runs_under_bf16_with_bf16_frozen_weights(family):
    bundle = build_flamingo(tiny_model_config(family, frozen_dtype="bfloat16"))
    model = bundle.model.eval()
    set_gates(model, 1.0)
    fp32 = copy.deepcopy(model).float()  # the same weights, fp32 throughout
    batch = bundle.tokenizer(["<image> a red circle <|endofchunk|> <image> the"], return_tensors="pt")
    images, image_mask = full_images(1, 2)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with bf16_autocast():
        out = model.generate(images, image_mask, batch.input_ids, batch.attention_mask, **kwargs)
    reference = fp32.generate(images, image_mask, batch.input_ids, batch.attention_mask, **kwargs)
    assert out.sequences.shape == (1, batch.input_ids.shape[1] + 3)
    first, expected = out.logits[0].float(), reference.logits[0]  # (1, V): the prompt's next-token logits
    assert torch.isfinite(first).all()
    assert (first - expected).abs().max() <= 2e-2 * expected.abs().max() + 1e-2
