"""Which of Composer's algorithms this trainer runs: every name in `composer.algorithms` is classified here.

Supported ones are tested with this model (3 steps, a checkpoint, an exact resume); refused ones stop the run when
its config loads, with the reason (`config error: algorithms.sam: <reason>`). Each was tried on yamls/run.yaml
(6 steps, an eval and a checkpoint every 3 steps, then a resume) with Composer 0.32.1; the reasons say what
happened. `unclassified()` lists what an installed Composer offers that nobody has classified (a test fails on
it). A supported algorithm's own argument checks run at config load too (`check_algorithm`), before anything
is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from composer.algorithms import GradientClipping
from composer.core import Algorithm, Callback

from flamingo_composer.training.ema import FlamingoEMA

__all__ = ["REFUSED", "SUPPORTED", "check_algorithm", "composer_algorithm_names", "unclassified"]

CLIPPING_TYPES = ("norm", "value", "adaptive")


def _check_gradient_clipping(kwargs: Mapping[str, Any], fsdp: Any) -> None:
    """Composer's GradientClipping checks nothing until its first step: the same checks, now."""
    clipping_type, threshold = kwargs.get("clipping_type"), kwargs.get("clipping_threshold")
    if clipping_type not in CLIPPING_TYPES:
        raise ValueError(f"clipping_type: must be one of {list(CLIPPING_TYPES)}, got {clipping_type!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold <= 0:
        raise ValueError(f"clipping_threshold: must be a number > 0, got {threshold!r}")
    if clipping_type == "adaptive" and fsdp is not None and fsdp.version == 1:
        raise ValueError("clipping_type: 'adaptive' is not available under FSDP1 (Composer clips norm or value)")


def _check_ema(kwargs: Mapping[str, Any], fsdp: Any) -> None:
    """FlamingoEMA's constructor checks its arguments; here what it needs of the run."""
    if fsdp is not None and fsdp.load_monolith_rank0_only:
        raise ValueError(
            "needs the model sharded before a checkpoint loads; set fsdp_config.load_monolith_rank0_only: false"
        )


@dataclass(frozen=True)
class Supported:
    """A supported algorithm: its constructor (an Algorithm, or a Callback where the algorithm runs as one, as
    `ema` does: training/ema.py says why), what it is for here, and its config-time checks."""

    build: Callable[..., Algorithm | Callback]
    use: str
    check: Callable[[Mapping[str, Any], Any], None]


SUPPORTED: dict[str, Supported] = {
    "gradient_clipping": Supported(
        GradientClipping,
        "the reference recipe's global-norm clip (1.0), once per optimizer step over all trainable parameters",
        _check_gradient_clipping,
    ),
    "ema": Supported(
        FlamingoEMA,
        "an average of the trainable weights for evaluation and export (training/ema.py, not Composer's EMA)",
        _check_ema,
    ),
}

_CRASHES = "crashes on this model"
_IMAGE_BATCH = (
    "expects one image-classification batch (input, target); the dual LAION/MMC4 batch is not one: " + _CRASHES
)
REFUSED: dict[str, str] = {
    "alibi": "replaces the LM's position embeddings by ALiBi in its attention: " + _CRASHES + " at start, and "
    "would change a frozen (released) LM",
    "augmix": _IMAGE_BATCH + " at the first batch",
    "blurpool": "replaces convolutions and pooling by blurred ones: a no-op here (the trainable modules have none; "
    "the vision tower is frozen)",
    "channels_last": "a memory format for convolutional networks: a no-op here",
    "colout": _IMAGE_BATCH + " at the first batch",
    "cutmix": _IMAGE_BATCH + " at the first batch",
    "cutout": _IMAGE_BATCH + " at the first batch",
    "factorize": "replaces Linear layers by factorized pairs: " + _CRASHES + " at realistic widths, and adds "
    "parameters the released format cannot hold",
    "gated_linear_units": "rewrites BERT feed-forwards: " + _CRASHES + " at start",
    "ghost_batchnorm": "batch norm only: a no-op here",
    "gyro_dropout": "replaces dropout in classifier heads: " + _CRASHES + " at start",
    "label_smoothing": "smooths a (N, C) classification target: " + _CRASHES + " at the first batch (the loss "
    "is the trainer's own, training/loss.py)",
    "layer_freezing": "freezes layers during training: the first checkpoint after it freezes anything fails "
    "(KeyError in torch's optimizer state_dict)",
    "low_precision_groupnorm": "group norm only: a no-op here",
    "low_precision_layernorm": "a no-op in fp32; under an amp precision it fails ('Parameter groups [-1, -1] are "
    "not in the optimizer') or, with one optimizer group, silently makes 22 frozen norm tensors trainable",
    "mixup": _IMAGE_BATCH + " at the first batch",
    "no_op_model": "replaces the model by a stand-in (a benchmarking aid): " + _CRASHES + " at the first batch",
    "progressive_resizing": _IMAGE_BATCH + " at the first batch",
    "randaugment": _IMAGE_BATCH + " at the first batch",
    "sam": "its checkpoint drops AdamW's moments: a resumed run diverges (12.8935 vs 13.0284 at step 6)",
    "selective_backprop": "drops samples by their loss in a classification batch: " + _CRASHES + " at the "
    "first batch",
    "seq_length_warmup": "truncates the input_ids of a single text batch: " + _CRASHES + " at start",
    "squeeze_excite": "adds blocks after convolutions: a no-op here (the trainable modules have none)",
    "stochastic_depth": "drops ResNet blocks: a no-op here",
    "swa": "every checkpoint carries a copy of the whole model, frozen towers included (about 30 GiB at 9B); "
    "use ema",
    "weight_standardization": "rewrites the frozen vision tower's patch embedding",
}


def composer_algorithm_names() -> dict[str, type[Algorithm]]:
    """Every Algorithm class the installed `composer.algorithms` offers, named by its subpackage (as llm-foundry
    and the YAML name them)."""
    import composer.algorithms as algorithms

    found = {}
    for cls in (getattr(algorithms, n) for n in algorithms.__all__):
        if isinstance(cls, type) and issubclass(cls, Algorithm):
            found[cls.__module__.split(".")[2]] = cls
    return found


def unclassified() -> list[str]:
    """Names the installed Composer offers that are neither supported nor refused here."""
    return sorted(set(composer_algorithm_names()) - set(SUPPORTED) - set(REFUSED))


def check_algorithm(name: str, kwargs: Mapping[str, Any] | None, fsdp: Any = None) -> Algorithm | Callback:
    """The algorithm `name` built from `kwargs` (its own argument checks run), or ValueError `algorithms.NAME: why`
    for a refused, unknown or badly configured one. `fsdp`: the run's FSDPSettings (None: no FSDP). Cheap:
    nothing touches a model."""
    key = f"algorithms.{name}"
    if name in REFUSED:
        raise ValueError(f"{key}: {REFUSED[name]}")
    if name not in SUPPORTED:
        raise ValueError(f"{key}: unknown name {name!r}; supported: {sorted(SUPPORTED)} (README: Algorithms)")
    from flamingo_composer.training.registry import check_kwargs  # the registry imports this module

    entry, kwargs = SUPPORTED[name], dict(kwargs or {})
    check_kwargs(entry.build, kwargs, key)  # unknown keywords, named `algorithms.NAME.KEY`
    try:
        entry.check(kwargs, fsdp)
        return entry.build(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key}: {exc}") from exc
