"""Step-level gradient equalities: microbatch size, world size, activation checkpointing, clipping once per step.

Every step runs through a real Composer Trainer with the data pipeline's split / sample / token functions, so
these tests cover Composer's gradient-accumulation weights and what the model does to undo them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from step_utils import REPO_ROOT, Z_LOSS_WEIGHT, dual_batch, run_one_step, tiny_bundle, zero_image_batch
from train_helpers import rank_launcher, subprocess_env


def _assert_grads_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        scale = want.abs().max().item()
        torch.testing.assert_close(
            actual[name], want, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def _global_norm(grads: dict) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bundle().tokenizer


@pytest.fixture(scope="module")
def batch(tokenizer):
    batch = dual_batch(tokenizer, laion_rows=4, mmc4_rows=2)
    for name in ("laion", "mmc4"):  # rows hold different numbers of supervised tokens: means would differ
        per_row = (batch[name]["labels"][:, 1:] != -100).sum(dim=1)
        assert len(set(per_row.tolist())) == len(per_row), per_row
    return batch


@pytest.fixture(scope="module")
def full_batch_step(batch):
    """Gradients and logged losses of the step with the whole batch as one microbatch."""
    return run_one_step(tiny_bundle().model, batch, microbatch_size=4, clip=None)


@pytest.mark.parametrize("microbatch_size", [2, 1])
def test_microbatch_size_does_not_change_gradients_or_logged_losses(batch, full_batch_step, microbatch_size):
    # 2: two chunks (LAION 2 + MMC4 1 rows each); 1: four chunks, the last two without any MMC4 row.
    grads, losses = run_one_step(tiny_bundle().model, batch, microbatch_size=microbatch_size, clip=None)
    full_grads, full_losses = full_batch_step
    _assert_grads_close(grads, full_grads)
    for key in ("loss/train/laion", "loss/train/mmc4", "loss/train/total"):
        assert losses[key] == pytest.approx(full_losses[key], rel=1e-6)


def test_logged_losses_are_global_token_means(batch, full_batch_step):
    flamingo = tiny_bundle().model
    _, losses = full_batch_step
    means = {}
    with torch.no_grad():
        for name in ("laion", "mmc4"):
            sub = batch[name]
            out = flamingo(images=sub["images"], image_mask=sub["image_mask"], input_ids=sub["input_ids"],
                           attention_mask=sub["attention_mask"], labels=sub["labels"])
            means[name] = out.loss.item()  # HF: mean over the batch's supervised shifted targets
    assert losses["loss/train/laion"] == pytest.approx(means["laion"], rel=1e-6)
    assert losses["loss/train/mmc4"] == pytest.approx(means["mmc4"], rel=1e-6)
    assert losses["loss/train/total"] == pytest.approx(0.2 * means["laion"] + means["mmc4"], rel=1e-6)


def test_averaging_microbatch_means_would_differ(batch, full_batch_step):
    """Sensitivity check: the reference's per-microbatch means give other gradients on this batch."""
    from flamingo_composer.data.dataspec import split_batch

    flamingo = tiny_bundle().model

    chunks = split_batch(batch, 2)  # 2 MMC4 microbatches, then 2 LAION microbatches
    for chunk in chunks:
        for name, sub in chunk.items():
            mult = {"laion": 0.2, "mmc4": 1.0}[name]
            out = flamingo(images=sub["images"], image_mask=sub["image_mask"], input_ids=sub["input_ids"],
                           attention_mask=sub["attention_mask"], labels=sub["labels"])
            (mult * out.loss / 2).backward()  # mean of the dataset's two microbatch means
    naive = {f"model.{n}": p.grad for n, p in flamingo.named_parameters() if p.grad is not None}
    full_grads, _ = full_batch_step
    assert set(naive) == set(full_grads)
    worst = max((naive[n] - g).abs().max().item() / g.abs().max().item() for n, g in full_grads.items())
    assert worst > 1e-3


def test_activation_checkpointing_gives_the_same_gradients(batch, full_batch_step):
    # Both datasets present: LAION's blocks are recomputed during backward after the MMC4 forward ran, so any
    # media left on the layers would change LAION's recomputed activations and its gradients.
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    flamingo = tiny_bundle(gradient_checkpointing=True).model
    calls = []
    for block in (m for m in flamingo.modules() if isinstance(m, GatedCrossAttentionBlock)):
        # A pre-hook: recomputation stops early once it has the saved tensors, so forward hooks may not fire.
        block.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    n_blocks = sum(isinstance(m, GatedCrossAttentionBlock) for m in flamingo.modules())
    grads, losses = run_one_step(flamingo, batch, microbatch_size=4, clip=None)
    # Each block ran for LAION (4 rows) and MMC4 (2 rows), then again in backward: recomputation happened.
    assert sorted(calls) == sorted([4, 2] * n_blocks * 2)
    full_grads, full_losses = full_batch_step
    _assert_grads_close(grads, full_grads)
    assert losses["loss/train/total"] == pytest.approx(full_losses["loss/train/total"], rel=1e-6)


def test_gradient_clipping_runs_once_per_step_on_the_global_norm(batch, full_batch_step, monkeypatch):
    from flamingo_composer.training.builders import build_algorithms

    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def counting_clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls.append(len([p for p in parameters if p.grad is not None]))
        return original(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    full_grads, _ = full_batch_step
    norm = _global_norm(full_grads)
    threshold = 0.1 * norm  # low: the clip must act
    algorithms = build_algorithms({"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": threshold}})
    grads, _ = run_one_step(tiny_bundle().model, batch, microbatch_size=1, algorithms=algorithms)

    assert calls == [len(full_grads)]  # one call per optimizer step (4 microbatches), over every trainable tensor
    assert _global_norm(grads) == pytest.approx(threshold, rel=1e-4)
    # One global factor for every tensor (per-module clipping would scale the tensors differently).
    _assert_grads_close(grads, {n: g * (threshold / norm) for n, g in full_grads.items()}, rtol=1e-4)


@pytest.mark.slow
def test_two_ranks_give_the_gradients_of_one_rank(batch, full_batch_step, tmp_path: Path):
    """2 ranks (DDP over gloo), each rank half the batch in microbatches of 1 = one rank, whole batch; without
    and with a z-loss weight."""
    out = tmp_path / "rank0.pt"
    result = subprocess.run(
        [*rank_launcher(2), str(REPO_ROOT / "tests" / "step_utils.py"), str(out), "halves"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two_ranks = torch.load(out, weights_only=True)
    assert two_ranks["world_size"] == 2
    full_grads, full_losses = full_batch_step
    _assert_grads_close(two_ranks["grads"], full_grads)
    for key in ("loss/train/laion", "loss/train/mmc4", "loss/train/total"):
        assert two_ranks["losses"][key] == pytest.approx(full_losses[key], rel=1e-6)
    z_grads, z_losses = run_one_step(tiny_bundle().model, batch, microbatch_size=4, clip=None,
                                     z_loss_weight=Z_LOSS_WEIGHT)  # fmt: skip
    _assert_grads_close(two_ranks["z_loss"]["grads"], z_grads)
    for key in ("loss/train/total", "loss/train/z_loss/laion", "loss/train/z_loss/mmc4"):
        assert two_ranks["z_loss"]["losses"][key] == pytest.approx(z_losses[key], rel=1e-6), key


@pytest.mark.slow
def test_a_rank_without_images_does_not_hang_fsdp2_and_matches_one_rank(tmp_path: Path):
    """MMC4 only, rank 1's documents hold no image, FSDP2 over 2 ranks: every rank still runs the vision encoder
    and perceiver (a skipped forward would skip an all-gather the other rank waits in: a hang, cut by the
    timeout), and the step equals one rank's on the whole batch."""
    out = tmp_path / "rank0.pt"
    result = subprocess.run(
        [*rank_launcher(2), str(REPO_ROOT / "tests" / "step_utils.py"), str(out), "zero_image"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two_ranks = torch.load(out, weights_only=True)
    assert two_ranks["calls"][1]["vision_encoder"] >= 1 and two_ranks["calls"][1]["perceiver"] >= 1
    bundle = tiny_bundle()
    batch = zero_image_batch(bundle.tokenizer)
    assert not batch["mmc4"]["image_mask"][2:].any() and batch["mmc4"]["image_mask"][:2].any()
    grads, losses = run_one_step(bundle.model, batch, clip=None)
    _assert_grads_close(two_ranks["grads"], grads)
    assert two_ranks["losses"]["loss/train/mmc4"] == pytest.approx(losses["loss/train/mmc4"], rel=1e-6)
