"""Shared helpers of the training-step tests: models, dual batches, one-step Trainers, gradient capture.

Also a script: `torchrun --standalone --nproc_per_node 2 tests/step_utils.py OUT.pt` runs one optimizer step of
the tiny model on each rank's half of `dual_batch(seed=0)` (DDP over gloo) and saves rank 0's gradients to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from composer import Callback, State, Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger, Logger

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openflamingo-tiny-gptneox"


# ----------------------------------------------------------------------------------------------------- models


def reference_bundle():
    """The fixture's model (tiny ViT, GPT-NeoX from lm/, xattn every 2 layers) with `full_state.pt` loaded."""
    from flamingo_composer.models.factory import (
        FlamingoModelConfig,
        LMConfig,
        TokenizerConfig,
        VisionConfig,
        build_flamingo,
    )
    from flamingo_composer.models.reference_checkpoint import load_reference_state_dict

    cfg = FlamingoModelConfig(
        vision=VisionConfig(config_path=str(REFERENCE_FIXTURE / "vision" / "of-tiny-vit-small.json")),
        lm=LMConfig(name=str(REFERENCE_FIXTURE / "lm")),
        tokenizer=TokenizerConfig(name=str(REFERENCE_FIXTURE / "lm")),
        cross_attn_every_n_layers=2,
        seed=0,
    )
    bundle = build_flamingo(cfg)
    load_reference_state_dict(bundle.model, REFERENCE_FIXTURE / "full_state.pt")
    return bundle


def full_images(batch: int, slots: int, size: int = 32, *, seed: int | None = None):
    """Random float images for every slot: images (batch * slots, 3, size, size), image_mask (batch, slots)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    images = torch.randn(batch * slots, 3, size, size, generator=gen)
    return images, torch.ones(batch, slots, dtype=torch.bool)


def greedy_steps(model, images, image_mask, ids, mask, steps: int):
    """Exactly `steps` greedy tokens through the KV cache, with each step's logits (`out.logits[k]`: (B, V))."""
    return model.generate(images, image_mask, ids, mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)  # fmt: skip


def assert_cached_steps_equal_full_forwards(model, images, image_mask, ids, out, **tolerance) -> None:
    """Each cached step's logits = a full forward (no cache) over the prompt and the tokens generated so far."""
    with torch.no_grad():
        for k, logits in enumerate(out.logits):
            prefix = out.sequences[:, : ids.shape[1] + k]
            full = model(images, image_mask, prefix, torch.ones_like(prefix)).logits[:, -1]  # (B, V)
            torch.testing.assert_close(logits, full, **tolerance)


def set_gates(model: torch.nn.Module, value: float) -> None:
    """Every gated cross-attention block's attn and ff gates to `value` (0 = the bare LM; non-zero = images matter)."""
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, GatedCrossAttentionBlock):
                block.attn_gate.fill_(value)
                block.ff_gate.fill_(value)


def tiny_bundle(seed: int = 0, gate: float = 0.5, **overrides):
    """The built-in tiny GPT-NeoX Flamingo with non-zero gates, so images and every block get gradients."""
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    bundle = build_flamingo(tiny_model_config("gpt_neox", seed=seed, **overrides))
    set_gates(bundle.model, gate)
    return bundle


# ---------------------------------------------------------------------------------------------------- batches


def reference_batch() -> dict:
    """The fixture's batch in our schema (`lang_x` -> `input_ids`, its padded `vision_x` made compact)."""
    from flamingo_composer.models.reference_images import compact_images

    raw = torch.load(REFERENCE_FIXTURE / "batch.pt", weights_only=True)
    batch = {}
    for name in ("laion", "mmc4"):
        sub = raw[name]
        images, image_mask = compact_images(sub["vision_x"])  # (N, 3, H, W), (B, T_img)
        batch[name] = {
            "images": images,
            "image_mask": image_mask,
            "input_ids": sub["lang_x"],
            "attention_mask": sub["attention_mask"],
            "labels": sub["labels"],
            "skipped": {},
        }
    return batch


def dual_batch(tokenizer, *, laion_rows: int = 4, mmc4_rows: int = 2, laion_len: int = 16, mmc4_len: int = 48,
               image_size: int = 32, max_images: int = 3, seed: int = 0, float_images: bool = True) -> dict:
    """A collated {'laion', 'mmc4'} batch whose rows hold different numbers of supervised tokens, images in the
    model's float form, or the loader's uint8 (`data/fake_batches.py`; documents with 1 to `max_images` images,
    some slots empty)."""
    from flamingo_composer.data.fake_batches import FakeDataset, fake_batch

    shapes = {
        "laion": FakeDataset("pairs", laion_rows, laion_len),
        "mmc4": FakeDataset("interleaved", mmc4_rows, mmc4_len, max_images, tuple(range(1, max_images + 1))),
    }
    return fake_batch(tokenizer, shapes, image_size=image_size, seed=seed, float_images=float_images)


def text_only_rows(tokenizer, batch: dict, rows: slice) -> dict:
    """The MMC4 part of `batch` alone, with `rows` turned into text-only documents: every `<image>` replaced by a
    word, no image in any slot (their labels are then all ignored, as SPEC 2's masking says)."""
    from flamingo_composer.data.masking import mmc4_labels
    from flamingo_composer.special_tokens import SpecialTokens
    from flamingo_composer.vocab import WORDS

    special = SpecialTokens.from_tokenizer(tokenizer)
    sub = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch["mmc4"].items()}
    ids = sub["input_ids"][rows]  # (R, L) view
    ids[ids == special.media] = tokenizer.convert_tokens_to_ids(WORDS[0])
    image_rows = sub["image_mask"].nonzero()[:, 0]  # (N,): the row of each image
    dropped = torch.zeros(len(sub["image_mask"]), dtype=torch.bool)
    dropped[rows] = True
    sub["images"] = sub["images"][~dropped[image_rows]]  # (N', 3, H, W)
    sub["image_mask"][rows] = False
    sub["labels"] = mmc4_labels(sub["input_ids"], special, sub["attention_mask"])
    return {"mmc4": sub}


def device_vision_x(image_transform, sub: dict) -> torch.Tensor:
    """A loader sub-batch's uint8 `images` as the model sees them (the DataSpec's device normalisation), in the
    reference's padded form (B, T_img, 1, 3, H, W), to compare with the reference's float pipeline."""
    from flamingo_composer.data.dataspec import NormalizeImages
    from flamingo_composer.data.images import SplitImageTransform
    from flamingo_composer.models.reference_images import padded_vision_x

    normalize = NormalizeImages(SplitImageTransform.of(image_transform))
    return padded_vision_x(normalize({"sub": sub})["sub"]["images"], sub["image_mask"])


def rank_slice(batch: dict, rank: int, world_size: int) -> dict:
    """Rank `rank`'s share of a global batch (contiguous rows, with their images)."""
    from flamingo_composer.data.dataspec import select_rows

    out = {}
    for name, sub in batch.items():
        rows = torch.arange(sub["input_ids"].shape[0]).tensor_split(world_size)[rank]
        out[name] = select_rows(sub, slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0))
    return out


# --------------------------------------------------------------------------------------------------- trainers


def step_losses(model, batch: dict) -> dict:
    """`model.loss` of `batch` taken as one whole optimizer step: its global supervised-token counts installed
    first (what the StepTokenCounts callback does in a Trainer), then forward and loss."""
    from flamingo_composer.training.loss import install_global_counts

    install_global_counts(batch)
    return model.loss(model(batch), batch)



class GradCapture(Callback):
    """Copies every trainable gradient at AFTER_TRAIN_BATCH (after gradient clipping, before the step)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def after_train_batch(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, "module") else state.model
        self.grads.append({
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        })


class LossRecorder(Callback):
    """Per-step logged losses (`state.total_loss_dict`, what Composer logs as loss/train/*)."""

    def __init__(self):
        self.losses: list[tuple[int, dict[str, float]]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append((int(state.timestamp.batch), dict(state.total_loss_dict)))


class BatchList:
    """A fixed list of batches as a dataloader (with the `batch_size` Composer reads for microbatching)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        lead = next(iter(batches[0].values()))  # the first dataset: microbatch sizes count its rows
        self.batch_size = lead["input_ids"].shape[0]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def dual_dataspec(batches: list[dict]) -> DataSpec:
    """The data pipeline's DataSpec (split, sample and token counts) over fixed batches."""
    from flamingo_composer.data.dataspec import build_dataspec

    return build_dataspec(BatchList(batches))


def one_step_trainer(flamingo, batch: dict, *, microbatch_size: int | None = None, clip: float | None = 1.0,
                     lr: float = 1e-4, weight_decay: float = 0.1, callbacks=(), loss_multipliers=None,
                     algorithms=None, parallelism_config=None, z_loss_weight: float = 0.0) -> Trainer:
    """A real Composer Trainer for one optimizer step of `flamingo` on `batch` (fp32, CPU), as run.py builds it."""
    from flamingo_composer.training.builders import build_optimizer
    from flamingo_composer.training.composer_model import FlamingoComposerModel
    from flamingo_composer.training.config import OptimizerConfig
    from flamingo_composer.training.loss import REQUIRED_TRAINER_KWARGS, StepTokenCounts

    model = FlamingoComposerModel(flamingo, loss_multipliers, z_loss_weight=z_loss_weight)
    if parallelism_config is not None:
        from flamingo_composer.training.fsdp import install_fsdp_policies

        install_fsdp_policies(model)
    optimizer = build_optimizer(OptimizerConfig(lr=lr, weight_decay=weight_decay), flamingo)
    if algorithms is None:
        from composer.algorithms import GradientClipping

        algorithms = [GradientClipping(clipping_type="norm", clipping_threshold=clip)] if clip is not None else []
    return Trainer(
        model=model,
        train_dataloader=dual_dataspec([batch]),
        max_duration="1ba",
        optimizers=optimizer,
        algorithms=algorithms,
        callbacks=[StepTokenCounts(), *callbacks],
        loggers=[InMemoryLogger()],
        device="cpu",
        precision="fp32",
        device_train_microbatch_size=microbatch_size or BatchList([batch]).batch_size,
        progress_bar=False,
        seed=0,
        parallelism_config=parallelism_config,
        **REQUIRED_TRAINER_KWARGS,
    )


def run_one_step(flamingo, batch: dict, **kwargs) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(gradients the optimizer saw, logged losses) of one step."""
    grads, losses = GradCapture(), LossRecorder()
    trainer = one_step_trainer(flamingo, batch, callbacks=[grads, losses, *kwargs.pop("callbacks", ())], **kwargs)
    trainer.fit()
    trainer.close()
    return grads.grads[0], losses.losses[0][1]


def peak_cpu_memory(fn) -> int:
    """Peak bytes of CPU tensor memory that `fn()` allocates on top of what exists: benchmarks/bench.py's
    `step_tensor_peak` (torch.profiler's allocation and free events), the measure the benchmarks print; a
    structural measure, the same on any machine."""
    from benchmarks import bench

    return bench.step_tensor_peak(fn)


# ------------------------------------------------------------------------------------------- 2-rank script


def _two_rank_main(out_path: str, scenario: str) -> None:
    """`torchrun ... tests/step_utils.py OUT.pt SCENARIO`: one step on each rank's share of the global batch.

    'halves': the dual batch, microbatches of 1, then again with a z-loss weight of Z_LOSS_WEIGHT (its record under
    'z_loss'). 'zero_image': MMC4 only, rank 1's documents hold no image, under
    FSDP2 (where a rank that skipped a module's forward would leave the others waiting in its all-gather), and
    each rank records how often its vision encoder and perceiver ran.
    """
    from composer.utils import dist

    dist.initialize_dist("cpu")
    rank, world = dist.get_global_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    bundle = tiny_bundle()
    calls = {"vision_encoder": 0, "perceiver": 0}
    if scenario == "zero_image":
        batch = rank_slice(zero_image_batch(bundle.tokenizer), rank, world)
        from composer.utils import FSDP2Config

        from flamingo_composer.training.callbacks import FSDP2AfterWrap

        for name in calls:
            getattr(bundle.model, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        kwargs = {"microbatch_size": None, "parallelism_config": {"fsdp": FSDP2Config()},
                  "callbacks": [FSDP2AfterWrap()]}  # fmt: skip
    else:
        batch = rank_slice(dual_batch(bundle.tokenizer), rank, world)
        kwargs = {"microbatch_size": 1}
    grads, losses = run_one_step(bundle.model, batch, clip=None, **kwargs)
    grads = {n.replace("_checkpoint_wrapped_module.", ""): (g.full_tensor() if hasattr(g, "full_tensor") else g)
             for n, g in grads.items()}  # fmt: skip
    record = {"grads": grads, "losses": losses, "world_size": world, "calls": dist.all_gather_object(calls)}
    if scenario == "halves":
        z_grads, z_losses = run_one_step(tiny_bundle().model, batch, clip=None, z_loss_weight=Z_LOSS_WEIGHT, **kwargs)
        record["z_loss"] = {"grads": z_grads, "losses": z_losses}
    if rank == 0:
        torch.save(record, out_path)


Z_LOSS_WEIGHT = 0.05


def zero_image_batch(tokenizer) -> dict:
    """A global MMC4-only batch of 4 documents whose second half holds no image (rank 1's share with 2 ranks)."""
    return text_only_rows(tokenizer, dual_batch(tokenizer, mmc4_rows=4), slice(2, 4))


if __name__ == "__main__":
    _two_rank_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "halves")
