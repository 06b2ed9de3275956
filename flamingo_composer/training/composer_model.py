"""FlamingoComposerModel: the Composer wrapper that turns a dual LAION + MMC4 batch into the SPEC 2 loss.

Loss per optimizer step: `m_laion * CE_laion + m_mmc4 * CE_mmc4`, where each CE is the mean over ALL supervised
tokens of that dataset in the global batch (all microbatches, all ranks). Each microbatch contributes
`sum of its token CEs / N_global`, with `N_global` = all-reduce of the sub-batch's `num_supervised_tokens`
(the whole per-rank sub-batch count that `split_batch` copies into every microbatch). Summed over microbatches
and ranks this is exactly the global token mean, whatever the microbatch size or world size.

Composer does not sum: it backpropagates `loss * w` per microbatch and DDP averages gradients over ranks. This
model needs the trainer to weight microbatches by loss-generating tokens
(`Trainer(accumulate_train_batch_on_tokens=True)`, see `REQUIRED_TRAINER_KWARGS`), with the DataSpec counting
`labels[:, 1:] != -100` over both sub-batches as `'loss_generating'` (what `num_supervised_tokens` counts). Then
`w = t_mb * W / T_global` (t_mb: the microbatch's supervised tokens, T_global: all ranks' and datasets' total,
W: world size), and every returned value is multiplied by `T_global / t_mb`: gradients become
`sum_ranks sum_mb d(loss_mb)` and the logged `loss/train/*` (Composer's `sum_mb w * value`, averaged over ranks)
becomes the true global CE of each dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy
from composer.models import ComposerModel
from composer.utils import dist
from torch import nn
from torchmetrics import Metric

from flamingo_composer.data.config import DATASETS
from flamingo_composer.data.masking import IGNORE_INDEX, count_supervised_tokens
from flamingo_composer.models.logits import LogitTransform
from flamingo_composer.training.flops import FlamingoFlops

# Trainer settings this model's loss normalisation relies on (see the module docstring).
REQUIRED_TRAINER_KWARGS = {"accumulate_train_batch_on_tokens": True}
MODEL_INPUT_KEYS = ("vision_x", "input_ids", "attention_mask")
DEFAULT_CHUNK_TOKENS = 1024  # supervised positions per chunk of the CE: (1024, V) fp32 logits = 0.2 GB at V = 50k


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


def _check_model_inputs(name: str, sub: Mapping[str, Any]) -> int:
    """Rows of sub-batch `name` (0 for a zero-row part); KeyError naming what is missing."""
    missing = [k for k in MODEL_INPUT_KEYS if k not in sub]
    if missing:
        raise KeyError(f"batch['{name}'] lacks {missing} (needs {list(MODEL_INPUT_KEYS)})")
    return int(sub["input_ids"].shape[0])


def heldout_metric_names(datasets) -> list[str]:
    """Names of the held-out CE and token-accuracy metrics of `datasets` (an Evaluator's `metric_names`)."""
    return [f"{name}/{kind}" for name in datasets for kind in ("LanguageCrossEntropy", "TokenAccuracy")]


def _for_dataset(metric: Metric, dataset: str) -> Metric:
    """Marks a torchmetrics Metric with the dataset whose sub-batch feeds it (survives Composer's deepcopy)."""
    metric.flamingo_dataset = dataset
    return metric


class FlamingoComposerModel(ComposerModel):
    """Wraps one `Flamingo` module (its single child `self.model`, so FSDP1 clips one global norm)."""

    def __init__(self, model: nn.Module, loss_multiplier_laion: float = 0.2, loss_multiplier_mmc4: float = 1.0,
                 loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS):  # fmt: skip
        super().__init__()
        self.model = model
        self.loss_chunk_tokens = loss_chunk_tokens
        # Read the model's shapes now: once Composer wraps it under FSDP, parameters are flattened shards.
        self.flop_counter = FlamingoFlops.of(model)
        self.loss_multipliers = {"laion": float(loss_multiplier_laion), "mmc4": float(loss_multiplier_mmc4)}

    # ----------------------------------------------------------------------------------------------- forward

    @staticmethod
    def present_datasets(batch: Mapping[str, Any]) -> list[str]:
        """The datasets of `batch` in forward order; a batch must hold at least one and nothing unknown."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict {{'laion': ..., 'mmc4': ...}}, got {type(batch).__name__}")
        unknown = sorted(set(batch) - set(DATASETS))
        if unknown:
            raise KeyError(f"batch has unknown dataset key(s) {unknown}; expected a subset of {list(DATASETS)}")
        present = [name for name in DATASETS if name in batch]
        if not present:
            raise KeyError(f"batch holds no dataset; expected at least one of {list(DATASETS)}")
        return present

    def _forward_dataset(self, sub: Mapping[str, Any]) -> torch.Tensor | FinalHidden:
        inputs = {
            "vision_x": sub["vision_x"],  # (B, T_img, 1, 3, H, W)
            "input_ids": sub["input_ids"],  # (B, L)
            "attention_mask": sub["attention_mask"],  # (B, L)
            "image_mask": sub.get("image_mask"),  # (B, T_img) or None
        }
        if self.training and self.model.output_head is not None:  # the loss projects the supervised positions
            return FinalHidden(self.model(**inputs, final_hidden_states=True))  # (B, L, D)
        return self.model(**inputs).logits  # (B, L, V)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor | FinalHidden]:
        """One Flamingo forward per present sub-batch (LAION, then MMC4) -> {dataset: logits (B, L, V)}, or in
        training, for LMs with a head module, {dataset: FinalHidden (B, L, D)} (`loss` projects what it needs).

        A zero-row part (a microbatch that got no row of a smaller dataset) has no forward and no output.
        """
        return {
            name: self._forward_dataset(batch[name])
            for name in self.present_datasets(batch)
            if _check_model_inputs(name, batch[name]) > 0
        }

    # -------------------------------------------------------------------------------------------------- loss

    def _global_supervised_counts(self, batch: Mapping[str, Any], device) -> dict[str, torch.Tensor]:
        """{dataset: 0-d long} supervised-token counts of the present datasets, summed over all ranks.

        One all-reduce of a fixed-size vector (absent datasets count 0), so every rank makes the same collective
        even when a microbatch lacks a part. Built on the device: no host-device sync.
        """
        per_dataset = []
        for name in DATASETS:
            if name not in batch:
                per_dataset.append(torch.zeros((), dtype=torch.long, device=device))
                continue
            if "num_supervised_tokens" not in batch[name]:
                raise KeyError(
                    f"batch['{name}'] lacks 'num_supervised_tokens' (the per-rank whole-sub-batch count of "
                    "labels[:, 1:] != -100 that split_batch copies into every microbatch)"
                )
            per_dataset.append(torch.as_tensor(batch[name]["num_supervised_tokens"], device=device).long().reshape(()))
        counts = torch.stack(per_dataset)  # (n_datasets,)
        dist.all_reduce(counts, reduce_operation="SUM")
        return {name: counts[i] for i, name in enumerate(DATASETS) if name in batch}

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *args, **kwargs) -> dict:
        """{'total', 'laion', 'mmc4'} for this microbatch, scaled for Composer (see the module docstring).

        An absent dataset has no key. A dataset with no supervised token anywhere, or no row in this microbatch,
        contributes exactly 0.
        """
        names = self.present_datasets(batch)
        device = batch[names[0]]["labels"].device
        n_global = self._global_supervised_counts(batch, device)  # {dataset: 0-d long}
        microbatch_tokens = sum(count_supervised_tokens(batch[name]["labels"]) for name in names)  # 0-d long
        # T_global: supervised tokens of all datasets in the global batch, what Composer's token weights sum to.
        total_global = sum(n_global.values())  # 0-d long
        # Undo Composer's token weight w = t_mb * W / T_global: its sum over microbatches then ranks is a plain sum.
        # (A microbatch without supervised tokens has weight 0 and CE sums of 0, so the clamp changes nothing.)
        # In float64 (0-d): rounded to the loss dtype only at use, so a float64 run's gradients stay float64-exact.
        compensation = total_global.double() / microbatch_tokens.clamp(min=1).double()  # 0-d, on the device

        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)  # promoted to the loss dtype by the first dataset's share
        for name in names:
            if name not in outputs:  # zero-row part: no forward, contributes nothing
                losses[name] = torch.zeros((), device=device)
                continue
            output, labels = outputs[name], batch[name]["labels"]
            if isinstance(output, FinalHidden):
                ce_sum = head_cross_entropy_sum(output.hidden, labels, self.model.output_head, self.loss_chunk_tokens,
                                                self.model.logit_transform)  # fmt: skip
            else:
                ce_sum = token_cross_entropy_sum(output, labels)  # 0-d
            ce_share = ce_sum / n_global[name].clamp(min=1).to(ce_sum.dtype)  # share of the global CE mean
            losses[name] = ce_share * compensation.to(ce_share.dtype)
            total = total + self.loss_multipliers[name] * ce_share
        losses["total"] = total * compensation.to(total.dtype)
        return losses

    # ------------------------------------------------------------------------------------------------ eval

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any | None = None) -> dict[str, torch.Tensor]:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        """Held-out token CE and accuracy per dataset; none during training (they would cost a batch copy)."""
        if is_train:
            return {}
        metrics = {}
        for name in DATASETS:
            ce_name, accuracy_name = heldout_metric_names([name])
            metrics[ce_name] = _for_dataset(LanguageCrossEntropy(), name)
            metrics[accuracy_name] = _for_dataset(MaskedAccuracy(), name)
        return metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        name = getattr(metric, "flamingo_dataset", None)
        if name is None:
            raise ValueError(f"metric {type(metric).__name__} was not created by FlamingoComposerModel.get_metrics")
        if name not in outputs:  # e.g. a LAION-only evaluator: the MMC4 metrics see no data
            return
        logits = outputs[name]  # (B, L, V)
        vocab = logits.shape[-1]
        pred = logits[:, :-1].reshape(-1, vocab).float()  # (B*(L-1), V)
        target = shifted_targets(batch[name]["labels"]).reshape(-1)  # (B*(L-1),)
        metric.update(pred, target)

    # ----------------------------------------------------------------------------------------------- flops

    def flops_per_batch(self, batch: Mapping[str, Any]) -> float:
        """Frozen-aware training FLOPs of one per-rank batch (SpeedMonitor reports throughput and MFU from it)."""
        return sum(self.flop_counter.per_batch(batch).values())
