"""The loss contract of a training step: what is counted, how the token sums are taken, normalised and handed
to Composer. One place; the ComposerModel (composer_model.py) only calls `microbatch_losses`.

Per optimizer step:
1. Counts, once: `StepTokenCounts` (a callback, AFTER_DATALOADER, on the full per-rank batch) counts each
   dataset's supervised targets with `count_supervised_tokens`, sums them over ranks in ONE all-reduce and puts
   the result ({dataset: 0-d long}, every dataset's) into every sub-batch under `GLOBAL_COUNTS`; `split_batch`
   copies it into every microbatch.
2. Sums, per microbatch and dataset: the token CE and the z-loss term `logsumexp(logits)^2` of the supervised
   targets, from the final hidden states through the head `loss_chunk_tokens` positions at a time
   (`head_token_losses`: a frozen head fused with its gradient, `LinearCrossEntropySum`; a trained one
   checkpointed per chunk) or from full logits (`logits_token_losses`).
3. Normalisation: each sum / N_global[dataset] is this microbatch's share of that dataset's global token mean;
   the objective is `sum_d m_d * (CE_d + z_loss_weight * Z_d)`.
4. Composer's weighting, undone in one step (`undo_token_weighting`): with `REQUIRED_TRAINER_KWARGS` Composer
   backpropagates `value * t_mb * W / T_global` per microbatch (t_mb: its supervised tokens, T_global: all ranks'
   and datasets', W: world size) and DDP/FSDP average over ranks; every returned value is multiplied by
   `T_global / t_mb`, so gradients are the plain sum of the shares and the logged `loss/train/*` are the global
   means, whatever the microbatch size or world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from flamingo_composer.models.logits import LogitTransform

IGNORE_INDEX = -100  # a label the loss does not supervise
# Trainer settings the normalisation relies on (step 4 of the module docstring).
REQUIRED_TRAINER_KWARGS = {"accumulate_train_batch_on_tokens": True}
# Key of every sub-batch holding the step's global supervised-token counts, {dataset: 0-d long} (step 1).
GLOBAL_COUNTS = "global_supervised_tokens"
DEFAULT_CHUNK_TOKENS = 1024  # supervised positions per chunk of the CE: (1024, V) fp32 logits = 0.2 GB at V = 50k
Z_LOSS_KEY = "z_loss/{dataset}"  # a dataset's z-loss in the loss dict (logged as loss/train/z_loss/<dataset>)


# ---------------------------------------------------------------------------------------------------------------
# What is supervised: the one counting function.


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, L) -> next-token targets (B, L-1): position t predicts labels[t + 1]."""
    return labels[:, 1:]


def count_supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """0-d long count of the shifted targets `labels[:, 1:] != -100` (what the CE averages over)."""
    return (shifted_targets(labels) != IGNORE_INDEX).sum().long()


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, L) -> (N,) long: the flat positions b * L + t whose next token is a supervised target (the same
    N as `count_supervised_tokens`). Its size depends on the values: the DataSpec computes it on the host for
    every training microbatch (`SUPERVISED_POSITIONS`), so the loss reads nothing back from the device."""
    predicts = F.pad(shifted_targets(labels) != IGNORE_INDEX, (0, 1), value=False)  # (B, L): last predicts nothing
    return predicts.reshape(-1).nonzero().squeeze(1)  # (N,)


def upcast_for_loss(tensor: torch.Tensor) -> torch.Tensor:
    """At least fp32, as transformers' loss (`logits.float()`): bf16/fp16 logits go up, float64 ones stay float64
    (a float64 parity run is float64 through the loss too)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Step 1: the global counts, once per optimizer step.


def install_global_counts(batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict:
    """Count each dataset's supervised targets in the full per-rank `batch`, sum over ranks (one all-reduce) and
    store the result in every sub-batch under `GLOBAL_COUNTS`. Returns {dataset: 0-d long} (on `device`).

    Every rank holds the same datasets (the same config), so the vector's layout is the same on every rank.
    """
    names = list(batch)
    local = torch.stack([count_supervised_tokens(batch[name]["labels"]) for name in names])  # (n_datasets,)
    counts = local.to(device) if device is not None else local
    dist.all_reduce(counts, reduce_operation="SUM")
    global_counts = {name: counts[i] for i, name in enumerate(names)}
    for name in names:
        batch[name][GLOBAL_COUNTS] = global_counts
    return global_counts


class StepTokenCounts(Callback):
    """Step 1 of the loss contract (module docstring): the global counts, once per optimizer step, before
    Composer splits the batch. The trainer adds it (run.py); a Trainer without it fails at the first loss."""

    def after_dataloader(self, state: State, logger: Logger) -> None:
        install_global_counts(state.batch, state.device._device)


def global_counts_of(batch: Mapping[str, Any], names) -> dict[str, torch.Tensor]:
    """The step's {dataset: 0-d long} global counts that step 1 put into `batch` (every sub-batch holds all)."""
    sub = batch[names[0]]
    if GLOBAL_COUNTS not in sub:
        raise KeyError(
            f"batch['{names[0]}'] lacks '{GLOBAL_COUNTS}', the step's global supervised-token counts: train with "
            "training.loss.StepTokenCounts among the Trainer's callbacks (train_from_config adds it), or call "
            "install_global_counts(batch) on a full batch before computing its loss"
        )
    return sub[GLOBAL_COUNTS]


# ---------------------------------------------------------------------------------------------------------------
# Step 2: token sums of one dataset's microbatch.


class TokenLossSums(NamedTuple):
    """Sums over a microbatch's supervised targets: `objective` = ce + z_weight * z (what backward sees), and the
    two terms alone, detached (what is logged)."""

    objective: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor


def logits_token_losses(logits: torch.Tensor, labels: torch.Tensor, z_weight: float = 0.0) -> TokenLossSums:
    """Sums of the token CE and of logsumexp(logits)^2 over supervised shifted targets: logits (B, L, V), labels
    (B, L) -> 0-d each.

    The labels are shifted, not the logits (a view of all L positions, the last one ignored): no copy of the
    (B, L, V) tensor. Exactly 0 (not NaN) when no target is supervised.
    """
    vocab = logits.shape[-1]
    targets = F.pad(shifted_targets(labels), (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B*L,): L-1 predicts nothing
    flat = upcast_for_loss(logits.reshape(-1, vocab))  # (B*L, V)
    ce = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    supervised = targets != IGNORE_INDEX  # (B*L,)
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(z_weight)):
        lse = torch.logsumexp(flat, dim=-1)  # (B*L,)
        z = torch.where(supervised, lse.square(), 0).sum()  # 0-d
    objective = ce + z_weight * z if z_weight else ce
    return TokenLossSums(objective, ce.detach(), z.detach())


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The token CE sum alone (differentiable): logits (B, L, V), labels (B, L) -> 0-d."""
    return logits_token_losses(logits, labels).objective


def _chunk_token_losses(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, transform: LogitTransform, z_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = upcast_for_loss(transform.apply(head(hidden)))  # (n, V): one chunk's logits, the only ones alive
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if z_weight:
        z = torch.logsumexp(logits, dim=-1).square().sum()
        return ce + z_weight * z, ce.detach(), z.detach()
    with torch.no_grad():  # the diagnostic only: the graph is the CE's alone
        z = torch.logsumexp(logits, dim=-1).square().sum()
    return ce, ce.detach(), z


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
    """Token CE sum (+ z_weight * logsumexp^2) of a frozen head's logits, its gradient computed in forward (as
    Liger's fused linear CE).

    forward: one chunk's (n, V) logits, their log-softmax, and at once d(objective)/d(logits) = softmax *
    (1 + 2 w lse) - one_hot, projected back to d/d(hidden) (n, D) and d/d(new_rows) (K, D); only those small
    gradients are kept. So no (n, V) tensor survives the forward, and backward is a scaling: no recomputation of
    the head and no second (n, V) gradient tensor. The CE's arithmetic is autograd's own for
    `F.cross_entropy(upcast_for_loss(transform.apply(head(hidden))), targets, reduction='sum')`, in the same
    dtypes (`transform`: the LM's own logit steps, models/logits.py; a soft-cap keeps one more (n, V) tensor).
    lse (n,) = max - log_softmax[argmax], from tensors that exist anyway. Returns (objective, ce, z); the last two
    are not differentiable (they are logged).
    """

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, new_rows, new_ids, transform, z_weight):  # hidden (n, D)
        logits = F.linear(hidden, weight, bias)  # (n, V)
        if new_rows is not None:
            new_bias = None if bias is None else bias[new_ids]  # (K,): a tied head's bias covers every column
            new_logits = F.linear(hidden, new_rows.to(hidden.dtype), new_bias)  # (n, K)
            logits.index_copy_(-1, new_ids, new_logits.to(logits.dtype))
        logits_dtype = logits.dtype
        logits = transform.apply(logits)  # (n, V): as the LM's forward gives them
        top, top_index = logits.max(dim=-1)  # (n,), (n,): exact in any dtype, so taken before the upcast
        log_probs = torch.log_softmax(upcast_for_loss(logits), dim=-1)  # (n, V), fp32 at least
        if not transform:
            del logits  # at most two (n, V) tensors at a time
        loss = -log_probs.gather(-1, targets[:, None]).sum()  # 0-d
        lse = top.to(log_probs.dtype) - log_probs.gather(-1, top_index[:, None]).squeeze(-1)  # (n,): logsumexp
        z = lse.square().sum()  # 0-d
        grad_logits = log_probs.exp_()  # (n, V): softmax, in place
        if z_weight:
            grad_logits.mul_((1 + 2 * z_weight * lse)[:, None])  # + d(w lse^2) = 2 w lse softmax
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
        objective = loss + z_weight * z if z_weight else loss
        ce = loss.detach().clone()
        ctx.mark_non_differentiable(ce, z)
        return objective, ce, z

    @staticmethod
    def backward(ctx, grad_objective, grad_ce, grad_z):
        grad_hidden, grad_rows = ctx.saved_tensors
        grad_rows = None if grad_rows is None else grad_rows * grad_objective.to(grad_rows.dtype)
        return grad_hidden * grad_objective.to(grad_hidden.dtype), None, None, None, grad_rows, None, None, None


NO_TRANSFORM = LogitTransform()


def head_token_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    transform: LogitTransform = NO_TRANSFORM,
    z_weight: float = 0.0,
    positions: torch.Tensor | None = None,
) -> TokenLossSums:
    """The token sums of `transform.apply(head(hidden))` (the LM's logits), computed only at supervised positions
    and `chunk_tokens` at a time.

    hidden (B, L, D), labels (B, L) -> 0-d each. Equal to `logits_token_losses(logits, labels)` (the logits of
    unsupervised positions never enter the loss), but no (B, L, V) tensor exists. A frozen head (the LMs' own, and
    tied heads whose only trained rows are the new tokens') goes through `LinearCrossEntropySum`: each chunk's
    logits live only inside its forward. A head that trains as a whole has each chunk's (n, V) logits recomputed
    in backward (activation checkpointing) instead. Either way the head's memory is one chunk's, in fp32 at most.
    `positions`: `supervised_positions(labels)` when the host computed it (training); None: computed here.
    """
    if positions is None:
        positions = supervised_positions(labels)  # (N,)
    positions = positions.to(hidden.device)
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, D): they predict a target
    selected_targets = labels.reshape(-1).index_select(0, positions + 1)  # (N,): the next token, same row
    total = upcast_for_loss(hidden.sum()) * 0  # 0 in the loss dtype, graph kept (DDP, FSDP)
    ce = z = total.detach()
    if selected.shape[0] == 0:
        return TokenLossSums(total, ce, z)
    step = chunk_tokens or selected.shape[0]
    frozen = FrozenHead.of(head) if torch.is_grad_enabled() else None
    chunked = torch.is_grad_enabled() and selected.shape[0] > step
    for start in range(0, selected.shape[0], step):
        chunk = (selected[start : start + step], selected_targets[start : start + step])
        if frozen is not None:
            sums = LinearCrossEntropySum.apply(*chunk, *frozen, transform, z_weight)
        elif chunked:
            sums = torch.utils.checkpoint.checkpoint(
                _chunk_token_losses, *chunk, head, transform, z_weight, use_reentrant=False
            )
        else:
            sums = _chunk_token_losses(*chunk, head, transform, z_weight)
        total, ce, z = total + sums[0], ce + sums[1], z + sums[2]
    return TokenLossSums(total, ce, z)


def head_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    transform: LogitTransform = NO_TRANSFORM,
) -> torch.Tensor:
    """The token CE sum alone (differentiable) of `head_token_losses`: hidden (B, L, D), labels (B, L) -> 0-d."""
    return head_token_losses(hidden, labels, head, chunk_tokens, transform).objective


class FinalHidden(NamedTuple):
    """A training forward's output when the LM has a head module: last hidden states (B, L, D), not logits."""

    hidden: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Steps 3 and 4: normalisation and Composer's weighting.


def undo_token_weighting(
    values: dict[str, torch.Tensor], microbatch_tokens: torch.Tensor, total_global: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every value times T_global / t_mb, the inverse of Composer's token weight w = t_mb * W / T_global, so that
    its sum over microbatches then ranks is a plain sum (module docstring, step 4).

    A microbatch without supervised tokens has weight 0 and sums of 0, so the clamp changes nothing. The factor is
    float64 (0-d, on the device), rounded to each value's dtype only at use: a float64 run stays float64-exact.
    """
    compensation = total_global.double() / microbatch_tokens.clamp(min=1).double()  # 0-d
    return {key: value * compensation.to(value.dtype) for key, value in values.items()}


def microbatch_losses(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    names: list[str],
    multipliers: Mapping[str, float],
    sums_of,
    z_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """{'total', <dataset>, 'z_loss/<dataset>'} of one microbatch, for Composer (module docstring).

    `names`: the datasets of `batch`; `outputs[name]`: what `sums_of(output, sub_batch)` turns into `TokenLossSums`
    (a dataset without rows in this microbatch has no output and no key). The dataset keys hold the CE alone,
    the z keys the mean logsumexp^2, both global token means once Composer has summed them; 'total' is
    `sum_d m_d * (CE_d + z_weight * Z_d)`.
    """
    device = batch[names[0]]["labels"].device
    counts = global_counts_of(batch, names)  # {dataset: 0-d long}, every dataset's
    total_global = sum(counts.values())  # 0-d long: T_global, what Composer's token weights sum to
    microbatch_tokens = sum(count_supervised_tokens(batch[name]["labels"]) for name in names)  # 0-d long
    values: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=device)  # promoted to the loss dtype by the first dataset's share
    for name in (n for n in names if n in outputs):
        sums = sums_of(outputs[name], batch[name])
        count = counts[name].clamp(min=1)
        objective_share = sums.objective / count.to(sums.objective.dtype)  # share of the global token mean
        values[name] = sums.ce / count.to(sums.ce.dtype)
        values[Z_LOSS_KEY.format(dataset=name)] = sums.z / count.to(sums.z.dtype)
        total = total + multipliers[name] * objective_share
    values["total"] = total
    return undo_token_weighting(values, microbatch_tokens, total_global)
