"""The loss contract (training/loss.py): counts once per step, z-loss in value and gradient, and weight 0 equal to
the loss as it was before z-loss, bit for bit."""

from __future__ import annotations

import loss_before_z as before
import pytest
import torch
import torch.nn.functional as F
from step_utils import dual_batch, run_one_step, set_gates, tiny_bundle

from flamingo_composer.models.factory import build_flamingo
from flamingo_composer.models.logits import LogitTransform
from flamingo_composer.models.tiny import tiny_model_config
from flamingo_composer.training import loss as loss_module
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.loss import (
    FrozenHead,
    head_token_losses,
    install_global_counts,
    logits_token_losses,
)

SOFTCAP = LogitTransform((("softcap", 3.0),))


def _heads(dim: int, vocab: int, dtype) -> dict:
    """The three kinds of head: frozen (the LMs' own), tied with a bias (a SplicedLMHead whose only trained rows
    are the new tokens', as CTRL's), and trained as a whole (checkpointed per chunk)."""
    from flamingo_composer.models.embeddings import SplicedEmbedding, SplicedLMHead

    torch.manual_seed(0)
    frozen = torch.nn.Linear(dim, vocab, bias=False, dtype=dtype).requires_grad_(False)
    embedding = SplicedEmbedding(torch.randn(vocab, dim, dtype=dtype), new_token_ids=[3, vocab - 1])
    embedding.weight.requires_grad_(False)
    bias = torch.nn.Parameter(torch.randn(vocab, dtype=dtype), requires_grad=False)
    trained = torch.nn.Linear(dim, vocab, dtype=dtype)
    return {"frozen": frozen, "tied_bias": SplicedLMHead(embedding, bias), "trained": trained}


def _trained_tensors(head) -> list[torch.Tensor]:
    if hasattr(head, "_embedding"):
        return [head._embedding.new_token_rows]
    return [p for p in head.parameters() if p.requires_grad]


def _inputs(dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = (3 * torch.randn(3, 9, 16, dtype=dtype, generator=gen)).requires_grad_(True)  # (B, L, D)
    labels = torch.randint(0, 50, (3, 9), generator=gen)
    labels[0] = -100  # a row with no supervised token
    labels[1, :5] = -100
    labels[2, 4] = 3  # a new token's column
    return hidden, labels


@pytest.mark.parametrize("transform", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_tokens", [None, 7])
@pytest.mark.parametrize("kind", ["frozen", "tied_bias", "trained"])
def test_z_loss_weight_zero_gives_the_former_loss_and_gradients_bit_for_bit(kind, chunk_tokens, transform):
    head = _heads(16, 50, torch.float32)[kind]
    assert (FrozenHead.of(head) is None) == (kind == "trained")  # the fused path and the checkpointed one
    hidden, labels = _inputs(torch.float32)
    wrt = [hidden, *_trained_tensors(head)]
    transform = transform or LogitTransform()
    old = before.head_cross_entropy_sum(hidden, labels, head, chunk_tokens, transform)
    new = head_token_losses(hidden, labels, head, chunk_tokens, transform, z_weight=0.0)
    assert torch.equal(new.objective, old) and torch.equal(new.ce, old.detach())
    for a, b in zip(torch.autograd.grad(new.objective, wrt), torch.autograd.grad(old, wrt), strict=True):
        assert torch.equal(a, b)
    logits = transform.apply(head(hidden))  # (B, L, V): the full-logits path too
    old, new = before.token_cross_entropy_sum(logits, labels), logits_token_losses(logits, labels).objective
    assert torch.equal(new, old)
    new_grads = torch.autograd.grad(new, wrt, retain_graph=True)
    for a, b in zip(new_grads, torch.autograd.grad(old, wrt), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["gpt_neox", "mpt"])  # an untied head, and MPT's tied one (in its forward)
def test_the_model_loss_at_weight_zero_is_the_former_one_bit_for_bit(family):
    bundle = build_flamingo(tiny_model_config(family))
    set_gates(bundle.model, 0.5)
    model = FlamingoComposerModel(bundle.model, {"laion": 0.3, "mmc4": 0.7})
    batch = dual_batch(bundle.tokenizer)
    trainable = [p for p in bundle.model.parameters() if p.requires_grad]
    outputs = model(batch)
    old = before.microbatch_loss(bundle.model, outputs, batch, model.loss_multipliers)
    old_grads = torch.autograd.grad(old["total"], trainable)
    install_global_counts(batch)
    new = model.loss(model(batch), batch)
    new_grads = torch.autograd.grad(new["total"], trainable)
    for key in ("total", "laion", "mmc4"):
        assert torch.equal(new[key], old[key].detach()), key
    for a, b in zip(new_grads, old_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("transform", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_tokens", [None, 7])
@pytest.mark.parametrize("kind", ["frozen", "tied_bias", "trained"])
def test_z_loss_value_and_gradients_equal_autograd_through_ce_plus_w_logsumexp_squared(kind, chunk_tokens, transform):
    """The fused path computes the z-term's gradient in its forward; the others through autograd: both equal
    autograd's through `F.cross_entropy + w * logsumexp^2` of the LM's (transformed) logits, in float64."""
    weight = 0.1
    head = _heads(16, 50, torch.float64)[kind]
    hidden, labels = _inputs(torch.float64)
    wrt = [hidden, *_trained_tensors(head)]
    transform = transform or LogitTransform()
    logits = transform.apply(head(hidden))[:, :-1]  # (B, L-1, V)
    supervised = labels[:, 1:] != -100
    ce = F.cross_entropy(logits[supervised], labels[:, 1:][supervised], reduction="sum")
    z = torch.logsumexp(logits[supervised], dim=-1).square().sum()
    expected = 0.5 * (ce + weight * z)  # a scale: backward's use of the incoming gradient is checked too
    want = torch.autograd.grad(expected, wrt)
    got = head_token_losses(hidden, labels, head, chunk_tokens, transform, z_weight=weight)
    tolerance = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(got.ce, ce.detach(), **tolerance)
    torch.testing.assert_close(got.z, z.detach(), **tolerance)
    torch.testing.assert_close(got.objective, ce + weight * z, **tolerance)
    for a, b in zip(torch.autograd.grad(0.5 * got.objective, wrt), want, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    assert (z * weight).item() > 1e-2 * ce.item()  # the term matters on this input
    full = logits_token_losses(transform.apply(head(hidden)), labels, z_weight=weight)  # from full logits
    torch.testing.assert_close(full.z, z.detach(), **tolerance)
    for a, b in zip(torch.autograd.grad(0.5 * full.objective, wrt), want, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def test_z_loss_is_a_global_token_mean_per_dataset_and_enters_the_total_with_the_multiplier():
    bundle = tiny_bundle()
    batch = dual_batch(bundle.tokenizer)
    means = {}
    with torch.no_grad():
        for name in ("laion", "mmc4"):
            sub = batch[name]
            logits = bundle.model(sub["images"], sub["image_mask"], sub["input_ids"],
                                  sub["attention_mask"]).logits[:, :-1]  # fmt: skip
            supervised = sub["labels"][:, 1:] != -100
            means[name] = torch.logsumexp(logits[supervised], -1).square().mean().item()
    install_global_counts(batch)
    multipliers = {"laion": 0.2, "mmc4": 1.0}
    plain = FlamingoComposerModel(bundle.model, multipliers).loss(FlamingoComposerModel(bundle.model)(batch), batch)
    weighted_model = FlamingoComposerModel(bundle.model, multipliers, z_loss_weight=0.01)
    weighted = weighted_model.loss(weighted_model(batch), batch)
    for name in ("laion", "mmc4"):  # logged at weight 0 too
        assert plain[f"z_loss/{name}"].item() == pytest.approx(means[name], rel=1e-5)
        assert weighted[f"z_loss/{name}"].item() == pytest.approx(means[name], rel=1e-5)
        assert weighted[name].item() == pytest.approx(plain[name].item(), rel=1e-6)  # the CE alone
    expected = sum(m * (plain[n].item() + 0.01 * means[n]) for n, m in (("laion", 0.2), ("mmc4", 1.0)))
    assert weighted["total"].item() == pytest.approx(expected, rel=1e-5)


def test_the_step_counts_are_taken_once_per_optimizer_step_and_the_loss_makes_no_collective(monkeypatch):
    calls = []
    install = loss_module.install_global_counts
    monkeypatch.setattr(loss_module, "install_global_counts", lambda *a, **k: calls.append(1) or install(*a, **k))
    losses = loss_module.microbatch_losses

    def without_collectives(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(loss_module.dist, "all_reduce", lambda *a, **k: pytest.fail("the loss all-reduced"))
            return losses(*args, **kwargs)

    monkeypatch.setattr("flamingo_composer.training.composer_model.microbatch_losses", without_collectives)
    bundle = tiny_bundle()
    run_one_step(bundle.model, dual_batch(bundle.tokenizer), microbatch_size=1, clip=None)  # 4 + 2 microbatches
    assert calls == [1]


@pytest.mark.parametrize("microbatch_size", [2, 1])
def test_z_loss_gradients_and_logged_values_do_not_depend_on_the_microbatch_size(microbatch_size):
    from test_microbatching import _assert_grads_close

    bundle = tiny_bundle()
    batch = dual_batch(bundle.tokenizer)
    whole = run_one_step(tiny_bundle().model, batch, microbatch_size=4, clip=None, z_loss_weight=0.05)
    split = run_one_step(bundle.model, batch, microbatch_size=microbatch_size, clip=None, z_loss_weight=0.05)
    _assert_grads_close(split[0], whole[0])
    for key in ("loss/train/total", "loss/train/z_loss/laion", "loss/train/z_loss/mmc4"):
        assert split[1][key] == pytest.approx(whole[1][key], rel=1e-6), key
    no_z = run_one_step(tiny_bundle().model, batch, microbatch_size=4, clip=None)
    assert no_z[1]["loss/train/z_loss/mmc4"] == pytest.approx(whole[1]["loss/train/z_loss/mmc4"], rel=1e-6)
    assert whole[1]["loss/train/total"] > no_z[1]["loss/train/total"] + 1e-3  # the weighted term is in the total
