"""Dataset kinds: what a kind of data brings to every dataset of that kind, in one registry (`KINDS`).

A dataset is a named entry of `data:` (data/config.py) with a `kind`; the kind gives its preprocessing settings
(the `preprocess:` dataclass), the processor the readers call in their workers, the label rule, the collate, the
defaults of its batch size and loss multiplier, and its place in the forward order of a step's microbatches.

- `pairs`: image-text pairs, one image and its caption per row (LAION-style; data/laion.py).
- `interleaved`: documents of text and several images (MMC4's matched layout, or natural page order;
  data/interleaved.py picks the processor by `preprocess.layout`).

Adding a kind: one module defining its preprocessing dataclass, processor and label rule, and one `DatasetKind`
entry in `KINDS` below. The names `laion` and `mmc4` may leave `kind` out (`DEFAULT_KINDS`), so recipes written
before datasets were named entries keep working; any other name must give it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flamingo_composer.data.collate import LabelRule, collate_samples
from flamingo_composer.data.interleaved import interleaved_processor
from flamingo_composer.data.laion import LaionPreprocessConfig, LaionProcessor
from flamingo_composer.data.masking import laion_labels, mmc4_labels
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig
from flamingo_composer.special_tokens import SpecialTokens

# (tokenizer, split image transform, preprocess settings, seed) -> process(raw, *, epoch, key) -> tensors
ProcessorFactory = Callable[[Any, Any, Any, int], Callable[..., dict]]


@dataclass(frozen=True)
class DatasetKind:
    """One kind of training data. `forward_rank`: where its microbatches run in a step (lower first, see
    `forward_order`); `batch_size` (per rank) and `loss_multiplier`: defaults of a dataset of this kind."""

    name: str
    preprocess_config: type  # the dataclass of a dataset's `preprocess:` settings
    processor: ProcessorFactory
    labels: LabelRule  # which tokens the loss supervises
    batch_size: int
    loss_multiplier: float
    forward_rank: int

    def collate(self, samples, special: SpecialTokens, skipped: Mapping[str, int] | None = None, *,
                pin_memory: bool = False) -> dict:  # fmt: skip
        """Samples of a dataset of this kind -> one sub-batch (data/collate.py)."""
        return collate_samples(samples, special, self.labels, self.name, skipped, pin_memory=pin_memory)


PAIRS = DatasetKind(
    "pairs", LaionPreprocessConfig, LaionProcessor, laion_labels, batch_size=16, loss_multiplier=0.2, forward_rank=1
)  # 0.2: the reference's LAION multiplier (SPEC 3)
INTERLEAVED = DatasetKind(
    "interleaved", MMC4PreprocessConfig, interleaved_processor, mmc4_labels, batch_size=8, loss_multiplier=1.0,
    forward_rank=0,
)  # fmt: skip
KINDS: dict[str, DatasetKind] = {kind.name: kind for kind in (PAIRS, INTERLEAVED)}

# Dataset names whose kind may be left out.
DEFAULT_KINDS = {"laion": "pairs", "mmc4": "interleaved"}


def kind_named(kind: str) -> DatasetKind:
    """The registry entry of `kind`; ValueError starting with `kind:` for an unknown one."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown kind {kind!r}; the kinds: {', '.join(KINDS)}")
    return KINDS[kind]


def kind_of(name: str, kind: str | None) -> DatasetKind:
    """The kind of dataset `name` (`kind` as configured, None when left out); ValueError starting with `kind:`."""
    if kind is None and name not in DEFAULT_KINDS:
        raise ValueError(
            f"kind: missing; dataset '{name}' must give its kind ({' or '.join(KINDS)}): only "
            f"{' and '.join(DEFAULT_KINDS)} default to one"
        )
    return kind_named(DEFAULT_KINDS[name] if kind is None else kind)


def default_kinds(names) -> dict[str, DatasetKind]:
    """{name: kind} for datasets named without a config (hand-built batches): laion and mmc4 only."""
    return {name: kind_of(name, None) for name in names}


def default_loss_multipliers() -> dict[str, float]:
    """{laion: 0.2, mmc4: 1.0}: the multipliers of the default-kind names (a model built without a config)."""
    return {name: KINDS[kind].loss_multiplier for name, kind in DEFAULT_KINDS.items()}


def forward_order(kinds: Mapping[str, DatasetKind]) -> list[str]:
    """The order of a step's microbatches: by kind (interleaved, then pairs), then as `kinds` lists them.

    The first backward of a step allocates the trainable gradients (Composer sets them to None before each
    batch), so the kind with the larger activations (256-token documents with up to 6 images, against 32-token
    captions with one) runs while no gradient exists yet, and the smaller ones run with them. The summed
    gradients are the same in any order up to rounding; laion + mmc4 run MMC4's chunks, then LAION's, as before
    datasets were named.
    """
    return sorted(kinds, key=lambda name: kinds[name].forward_rank)  # stable: config order within a kind
