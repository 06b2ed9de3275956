"""The training loss as it was computed before z-loss and the loss module (a frozen copy, for tests only).

`tests/test_loss.py` checks that with `loss.z_loss_weight: 0` the loss module gives these values and gradients
bit for bit. Copied unchanged from training/composer_model.py as it was, plus `microbatch_loss`: its `loss()`
arithmetic for a batch that is one whole optimizer step on one rank.
"""
# ruff: noqa

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from flamingo_composer.models.logits import LogitTransform

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


def upcast_for_loss(tensor: torch.Tensor) -> torch.Tensor:
    """At least fp32, as transformers' loss (`logits.float()`): bf16/fp16 logits go up, float64 ones stay float64
    (a float64 parity run is float64 through the loss too)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, L) -> next-token targets (B, L-1): position t predicts labels[t + 1]."""
    return labels[:, 1:]


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over supervised shifted targets of the token CE: logits (B, L, V), labels (B, L) -> 0-d.

    The labels are shifted, not the logits (a view of all L positions, the last one ignored): no copy of the
    (B, L, V) tensor. Exactly 0 (not NaN) when no target is supervised.
    """
    vocab = logits.shape[-1]
    targets = F.pad(shifted_targets(labels), (0, 1), value=IGNORE_INDEX)  # (B, L): position L-1 predicts nothing
    return F.cross_entropy(
        upcast_for_loss(logits.reshape(-1, vocab)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class FinalHidden(NamedTuple):
    """A training forward's output when the LM has a head module: last hidden states (B, L, D), not logits."""

    hidden: torch.Tensor


NO_TRANSFORM = LogitTransform()


def _chunk_cross_entropy_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, transform: LogitTransform = NO_TRANSFORM
) -> torch.Tensor:
    logits = transform.apply(head(hidden))  # (n, V): one chunk's logits, the only ones alive at a time
    return F.cross_entropy(upcast_for_loss(logits), targets, reduction="sum")


class FrozenHead(NamedTuple):
    """An output head as tensors, for `LinearCrossEntropySum`: logits = hidden @ weight.T + bias, with the columns
    `new_ids` taken from hidden @ new_rows.T (tied LMs: `SplicedEmbedding.project`). Only `new_rows` may train."""

    weight: torch.Tensor  # (V, D), frozen
    bias: torch.Tensor | None  # (V,), frozen
    new_rows: torch.Tensor | None  # (K, D), in the autograd graph (the trained new-token rows)
    new_ids: torch.Tensor | None  # (K,)

    @classmethod
    def of(cls, head: nn.Module) -> FrozenHead | None:
        """The head's tensors, or None when its projection trains (a fully trainable head: recompute instead)."""
        from flamingo_composer.models.embeddings import SplicedLMHead

        if isinstance(head, SplicedLMHead):
            embedding = head._embedding
            if embedding.weight.requires_grad:
                return None
            return cls(embedding.weight, head.bias, embedding.trainable_rows(), embedding.new_token_ids)
        plain_linear = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
        if plain_linear and not any(p.requires_grad for p in head.parameters()):
            return cls(head.weight, head.bias, None, None)
        return None


class LinearCrossEntropySum(torch.autograd.Function):
    """Token CE sum of a frozen head's logits, with its gradient computed in forward (as Liger's fused linear CE).

    forward: one chunk's (n, V) logits, their log-softmax, and at once d(loss)/d(logits) = softmax - one_hot,
    projected back to d(loss)/d(hidden) (n, D) and d(loss)/d(new_rows) (K, D); only those small gradients are kept.
    So no (n, V) tensor survives the forward, and backward is a scaling: no recomputation of the head (as
    checkpointing needs) and no second (n, V) gradient tensor. The arithmetic is autograd's own for
    `F.cross_entropy(upcast_for_loss(transform.apply(head(hidden))), targets, reduction='sum')`, in the same dtypes
    (`transform`: the LM's own logit steps, models/logits.py; a soft-cap keeps one more (n, V) tensor).
    """

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, new_rows, new_ids, transform):  # hidden (n, D), targets (n,)
        logits = F.linear(hidden, weight, bias)  # (n, V)
        if new_rows is not None:
            new_bias = None if bias is None else bias[new_ids]  # (K,): a tied head's bias covers every column
            new_logits = F.linear(hidden, new_rows.to(hidden.dtype), new_bias)  # (n, K)
            logits.index_copy_(-1, new_ids, new_logits.to(logits.dtype))
        logits_dtype = logits.dtype
        logits = transform.apply(logits)  # (n, V): as the LM's forward gives them
        log_probs = torch.log_softmax(upcast_for_loss(logits), dim=-1)  # (n, V), fp32 at least
        if not transform:
            del logits  # at most two (n, V) tensors at a time
        loss = -log_probs.gather(-1, targets[:, None]).sum()  # 0-d
        grad_logits = log_probs.exp_()  # (n, V): softmax, in place
        grad_logits[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
        grad_logits = grad_logits.to(logits_dtype)  # as the upcast's backward hands it to the projection
        del log_probs
        if transform:
            grad_logits = transform.backward(grad_logits, logits)  # through the LM's logit steps
            del logits
        grad_rows = None
        if new_rows is not None:
            grad_new = grad_logits[:, new_ids]  # (n, K): the new columns' share (index_copy_'s backward)
            grad_logits.index_fill_(-1, new_ids, 0)
            if ctx.needs_input_grad[4]:
                grad_rows = (grad_new.t() @ hidden.to(grad_new.dtype)).to(new_rows.dtype)  # (K, D)
        grad_hidden = grad_logits @ weight.to(grad_logits.dtype)  # (n, D)
        if new_rows is not None:
            grad_hidden = grad_hidden + grad_new @ new_rows.to(grad_new.dtype)
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_rows = ctx.saved_tensors
        grad_rows = None if grad_rows is None else grad_rows * grad_loss.to(grad_rows.dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, grad_rows, None, None


def head_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    transform: LogitTransform = NO_TRANSFORM,
) -> torch.Tensor:
    """The token CE sum of `transform.apply(head(hidden))` (the LM's logits), computed only at supervised positions
    and `chunk_tokens` at a time.

    hidden (B, L, D), labels (B, L) -> 0-d. Equal to `token_cross_entropy_sum(logits, labels)` (the logits of
    unsupervised positions never enter the loss), but no (B, L, V) tensor exists. A frozen head (the LMs' own, and
    tied heads whose only trained rows are the new tokens') goes through `LinearCrossEntropySum`: each chunk's
    logits live only inside its forward. A head that trains as a whole has each chunk's (n, V) logits recomputed
    in backward (activation checkpointing) instead. Either way the head's memory is one chunk's, in fp32 at most.
    """
    targets = shifted_targets(labels)  # (B, L-1)
    supervised = targets != IGNORE_INDEX  # (B, L-1)
    selected = hidden[:, :-1][supervised]  # (N, D): the positions that predict a supervised target
    selected_targets = targets[supervised]  # (N,)
    total = upcast_for_loss(hidden.sum()) * 0  # 0 in the loss dtype, graph kept (DDP, FSDP)
    if selected.shape[0] == 0:
        return total
    step = chunk_tokens or selected.shape[0]
    frozen = FrozenHead.of(head) if torch.is_grad_enabled() else None
    chunked = torch.is_grad_enabled() and selected.shape[0] > step
    for start in range(0, selected.shape[0], step):
        chunk = (selected[start : start + step], selected_targets[start : start + step])
        if frozen is not None:
            total = total + LinearCrossEntropySum.apply(*chunk, *frozen, transform)
        elif chunked:
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_cross_entropy_sum, *chunk, head, transform, use_reentrant=False
            )
        else:
            total = total + _chunk_cross_entropy_sum(*chunk, head, transform)
    return total


def microbatch_loss(flamingo, outputs: dict, batch: dict, multipliers: dict, chunk_tokens=DEFAULT_CHUNK_TOKENS) -> dict:
    """The former `FlamingoComposerModel.loss` for a batch that is a whole step on one rank."""
    names = list(outputs)
    device = batch[names[0]]["labels"].device
    n_global = {name: (batch[name]["labels"][:, 1:] != IGNORE_INDEX).sum().long() for name in names}
    microbatch_tokens = sum(n_global.values())
    total_global = sum(n_global.values())
    compensation = total_global.double() / microbatch_tokens.clamp(min=1).double()
    losses = {}
    total = torch.zeros((), device=device)
    for name in names:
        output, labels = outputs[name], batch[name]["labels"]
        if hasattr(output, "hidden"):
            ce_sum = head_cross_entropy_sum(output.hidden, labels, flamingo.output_head, chunk_tokens,
                                            flamingo.logit_transform)
        else:
            ce_sum = token_cross_entropy_sum(output, labels)
        ce_share = ce_sum / n_global[name].clamp(min=1).to(ce_sum.dtype)
        losses[name] = ce_share * compensation.to(ce_share.dtype)
        total = total + multipliers[name] * ce_share
    losses["total"] = total * compensation.to(total.dtype)
    return losses
