"""What an LM's forward does to its output head's logits, so the training loss can do exactly the same.

The training loss projects the decoder's final hidden states with the output head itself (composer_model.py,
no (B, L, V) logits tensor). Some LMs change the head's logits inside their forward: Gemma-2/3 soft-cap them
(`final_logit_softcapping`; RecurrentGemma `logits_soft_cap`), Granite divides them (`logits_scaling`), Cohere
multiplies them (`logit_scale`), Falcon-H1 too (`lm_head_multiplier`). `LogitTransform` holds those steps, read from
the text config, and `check_training_logits` proves at build, on a short probe sequence (`LogitProbe`), that head +
transform give the LM's own logits: an LM that does anything else is refused with its class named, instead of
silently training another objective than the one it is evaluated on. The same probe checks that the LM with
Flamingo's layers and closed gates still gives its own logits (flamingo.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

LOSS_FROM_LOGITS_KEY = "model.lm.loss_from_logits"
PROBE_TOKENS = 8


@dataclass(frozen=True)
class LogitTransform:
    """Steps applied to the head's logits, in order: ('div', d), ('mul', m), then at most one ('softcap', c) last.

    Each step is the LM's own operation in its own dtype (x / d is not always x * (1 / d) in floating point).
    """

    steps: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        for i, (op, value) in enumerate(self.steps):
            if op not in ("div", "mul", "softcap"):
                raise ValueError(f"unknown logit step {op!r}")
            if op == "softcap" and i != len(self.steps) - 1:
                raise ValueError("the soft-cap must be the last logit step")
            if not value:
                raise ValueError(f"logit step {op!r} needs a non-zero value, got {value!r}")

    def __bool__(self) -> bool:
        return bool(self.steps)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) -> (..., V), as the LM's forward computes it."""
        for op, value in self.steps:
            if op == "div":
                logits = logits / value
            elif op == "mul":
                logits = logits * value
            else:  # softcap: c * tanh(x / c)
                logits = torch.tanh(logits / value) * value
        return logits

    def backward(self, grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(head logits) from d(loss)/d(output) and `output` = apply(head logits); may overwrite `output`."""
        for op, value in reversed(self.steps):
            if op == "softcap":  # d/dx c * tanh(x / c) = 1 - tanh^2 = 1 - (y / c)^2
                grad = grad * output.div_(value).square_().neg_().add_(1)
            elif op == "div":
                grad = grad / value
            else:
                grad = grad * value
        return grad


def logit_transform_of(lm: nn.Module) -> LogitTransform:
    """The logit steps of `lm`'s forward, from its text config (the families listed in the module docstring)."""
    from flamingo_composer.models.lm_adapter import text_config

    config = text_config(lm)
    steps: list[tuple[str, float]] = []
    if getattr(config, "logits_scaling", None):  # Granite, GraniteMoe*: logits / logits_scaling
        steps.append(("div", float(config.logits_scaling)))
    for key in ("logit_scale", "lm_head_multiplier"):  # Cohere 1/2; Falcon-H1
        if getattr(config, key, None) is not None:
            steps.append(("mul", float(getattr(config, key))))
    for key in ("final_logit_softcapping", "logits_soft_cap"):  # Gemma-2, Gemma-3; RecurrentGemma
        if getattr(config, key, None):
            steps.append(("softcap", float(getattr(config, key))))
    return LogitTransform(tuple(steps))


@dataclass(frozen=True)
class LogitProbe:
    """The bare LM's own logits (1, T, V) on a few token ids (1, T), taken once at build to check against."""

    ids: torch.Tensor
    logits: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, lm: nn.Module) -> LogitProbe:
        """Run the LM once (in eval mode, so dropout cannot differ). Call on real weights only."""
        from flamingo_composer.models.lm_adapter import no_cache

        vocab = lm.get_input_embeddings().weight.shape[0]
        device = lm.get_input_embeddings().weight.device
        ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % vocab)[None]  # (1, T): spread over the vocab
        try:
            with eval_mode(lm):
                return cls(ids, lm(input_ids=ids, **no_cache(lm)).logits)
        except Exception as exc:  # e.g. CPM-Ant, whose forward shifts the ids past the resized vocabulary
            raise ValueError(
                f"{type(lm).__name__}: the LM fails on token ids of its resized vocabulary ({type(exc).__name__}: "
                f"{exc}): not supported"
            ) from exc

    def matches(self, logits: torch.Tensor) -> bool:
        scale = max(1.0, float(self.logits.abs().max()))
        return logits.shape == self.logits.shape and torch.allclose(logits, self.logits, rtol=1e-4, atol=1e-4 * scale)

    def max_difference(self, logits: torch.Tensor) -> float | str:
        return (logits - self.logits).abs().max().item() if logits.shape == self.logits.shape else "shape"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode (no dropout) inside, its own mode after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def check_training_logits(lm: nn.Module, head: nn.Module, transform: LogitTransform, probe: LogitProbe) -> None:
    """Raise ValueError naming `lm`'s class unless transform(head(decoder hidden states)) equals its own logits."""
    from flamingo_composer.models.lm_adapter import lm_decoder, no_cache

    decoder = lm_decoder(lm)
    try:
        with eval_mode(lm):
            hidden = decoder(input_ids=probe.ids, **no_cache(decoder)).last_hidden_state  # (1, T, D)
            ours = transform.apply(head(hidden))  # (1, T, V)
    except Exception as exc:  # e.g. a head that expects another width (RemBERT's output_embedding_size)
        raise ValueError(
            f"{type(lm).__name__}: its output head cannot project its decoder's final hidden states "
            f"({type(exc).__name__}: {exc}). Set {LOSS_FROM_LOGITS_KEY}: true to train on the LM's own logits"
        ) from exc
    if not probe.matches(ours):
        raise ValueError(
            f"{type(lm).__name__}: its forward computes logits that the output head on the final hidden states, "
            f"with the logit steps {list(transform.steps)}, does not reproduce (max difference "
            f"{probe.max_difference(ours)}): the fused training loss would train another objective. Set "
            f"{LOSS_FROM_LOGITS_KEY}: true to train on the LM's own logits (slower, more memory)"
        )
