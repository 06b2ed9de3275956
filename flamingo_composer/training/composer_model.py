"""FlamingoComposerModel: the Composer wrapper that turns a batch of named datasets ({name: sub-batch}) into the
SPEC 2 loss.

One forward per sub-batch, in the batch's order; the loss of a microbatch, its normalisation over the global batch
and what Composer needs to see are the loss contract's (training/loss.py): `loss` only hands it the outputs and
how to turn each into token sums (through the LM's head and logit steps, or from full logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy
from composer.models import ComposerModel
from torch import nn
from torchmetrics import Metric

from flamingo_composer.data.host_indices import IMAGE_SLOTS, SUPERVISED_POSITIONS, TEXT_TIME, text_segments_of
from flamingo_composer.data.kinds import default_loss_multipliers
from flamingo_composer.training.flops import FlamingoFlops
from flamingo_composer.training.loss import (
    DEFAULT_CHUNK_TOKENS,
    REQUIRED_TRAINER_KWARGS,
    FinalHidden,
    TokenLossSums,
    head_token_losses,
    logits_token_losses,
    microbatch_losses,
    shifted_targets,
)

__all__ = ["REQUIRED_TRAINER_KWARGS", "FinalHidden", "FlamingoComposerModel", "heldout_metric_names"]

MODEL_INPUT_KEYS = ("images", "image_mask", "input_ids", "attention_mask")


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
    """Wraps one `Flamingo` module (its single child `self.model`, so FSDP1 clips one global norm).

    `loss_multipliers`: {dataset name: weight in the loss} of every dataset a batch may hold (the config's
    `DataConfig.loss_multipliers()`); the held-out metrics exist per name. Default: laion 0.2, mmc4 1.0.
    """

    def __init__(self, model: nn.Module, loss_multipliers: Mapping[str, float] | None = None,
                 loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, z_loss_weight: float = 0.0):  # fmt: skip
        super().__init__()
        self.model = model
        self.loss_chunk_tokens = loss_chunk_tokens
        self.z_loss_weight = float(z_loss_weight)
        # Read the model's shapes now: once Composer wraps it under FSDP, parameters are flattened shards.
        self.flop_counter = FlamingoFlops.of(model)
        multipliers = default_loss_multipliers() if loss_multipliers is None else loss_multipliers
        self.loss_multipliers = {name: float(weight) for name, weight in multipliers.items()}

    # ----------------------------------------------------------------------------------------------- forward

    def present_datasets(self, batch: Mapping[str, Any]) -> list[str]:
        """The datasets of `batch` in its order; a batch must hold at least one and nothing unknown."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict {{dataset name: sub-batch}}, got {type(batch).__name__}")
        known = list(self.loss_multipliers)
        unknown = [name for name in batch if name not in self.loss_multipliers]
        if unknown:
            raise KeyError(f"batch has unknown dataset key(s) {unknown}; expected a subset of {known}")
        if not batch:
            raise KeyError(f"batch holds no dataset; expected at least one of {known}")
        return list(batch)

    def _forward_dataset(self, sub: Mapping[str, Any]) -> torch.Tensor | FinalHidden:
        """Training batches are right-padded: no real token sees a later (padding) position, so the LM runs
        without the attention mask (transformers' mask builder would read the mask back from the device to see
        whether it can skip it). Evaluation passes it."""
        inputs = {
            "images": sub["images"],  # (N, 3, H, W) floats, after the DataSpec's normalisation
            "image_mask": sub["image_mask"],  # (B, T_img)
            "input_ids": sub["input_ids"],  # (B, L)
            "attention_mask": None if self.training else sub["attention_mask"],  # (B, L)
            "image_slots": sub.get(IMAGE_SLOTS),  # (N,) or None
            "text_time": sub.get(TEXT_TIME),  # (B, L) or None
            "text_segments": text_segments_of(sub),
        }
        if self.training and self.model.output_head is not None:  # the loss projects the supervised positions
            return FinalHidden(self.model(**inputs, final_hidden_states=True))  # (B, L, D)
        return self.model(**inputs).logits  # (B, L, V)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor | FinalHidden]:
        """One Flamingo forward per present sub-batch, in the batch's order -> {dataset: logits (B, L, V)}, or in
        training, for LMs with a head module, {dataset: FinalHidden (B, L, D)} (`loss` projects what it needs).

        A sub-batch without rows has no forward and no output.
        """
        return {
            name: self._forward_dataset(batch[name])
            for name in self.present_datasets(batch)
            if _check_model_inputs(name, batch[name]) > 0
        }

    # -------------------------------------------------------------------------------------------------- loss

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any], *args, **kwargs) -> dict:
        """{'total', <dataset>, 'z_loss/<dataset>'} of this microbatch, for Composer (training/loss.py).

        A dataset with no supervised token anywhere contributes exactly 0; one without rows here has no key.
        """
        return microbatch_losses(outputs, batch, self.present_datasets(batch), self.loss_multipliers,
                                 self._token_sums, self.z_loss_weight)  # fmt: skip

    def _token_sums(self, output: torch.Tensor | FinalHidden, sub: Mapping[str, Any]) -> TokenLossSums:
        if isinstance(output, FinalHidden):
            return head_token_losses(output.hidden, sub["labels"], self.model.output_head, self.loss_chunk_tokens,
                                     self.model.logit_transform, self.z_loss_weight,
                                     sub.get(SUPERVISED_POSITIONS))  # fmt: skip
        return logits_token_losses(output, sub["labels"], self.z_loss_weight)  # (B, L, V) logits

    # ------------------------------------------------------------------------------------------------ eval

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any | None = None) -> dict[str, torch.Tensor]:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        """Held-out token CE and accuracy per dataset; none during training (they would cost a batch copy)."""
        if is_train:
            return {}
        metrics = {}
        for name in self.loss_multipliers:
            ce_name, accuracy_name = heldout_metric_names([name])
            metrics[ce_name] = _for_dataset(LanguageCrossEntropy(), name)
            metrics[accuracy_name] = _for_dataset(MaskedAccuracy(), name)
        return metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        name = getattr(metric, "flamingo_dataset", None)
        if name is None:
            raise ValueError(f"metric {type(metric).__name__} was not created by FlamingoComposerModel.get_metrics")
        if name not in outputs:  # a dataset the held-out loader does not hold: its metrics see no data
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
