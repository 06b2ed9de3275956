"""Interleave gated cross-attention blocks with a Hugging Face causal LM's decoder layers.

Each decoder layer is replaced by a `FlamingoLayer` (children `decoder_layer`, the original untouched, and
`gated_cross_attn_layer`, a block or None). The layer reads the media of the current call from a
`MediaContext` that `Flamingo.forward` / `generate` activate for exactly the duration of the call, and passes
them to the block as explicit arguments: nothing about one call's images stays on the layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock


@dataclass(frozen=True)
class LMFamily:
    """Where a decoder-only family keeps what Flamingo needs (attribute paths from the causal-LM root)."""

    decoder_layers: str  # the decoder-layer ModuleList
    hidden_size: str = "hidden_size"  # config attribute holding the residual-stream width
    input_embedding: str | None = None  # the input embedding, for LMs without get/set_input_embeddings


# config.model_type -> family facts (the reference's table, plus the remote-code LMs of the released models:
# `mosaic_gpt` = anas-awadalla/mpt-1b-redpajama-200b, `mpt` also covers anas-awadalla/mpt-7b's own MPT code).
LM_FAMILIES: dict[str, LMFamily] = {
    "llama": LMFamily("model.layers"),
    "mistral": LMFamily("model.layers"),
    "gpt_neox": LMFamily("gpt_neox.layers"),
    "mpt": LMFamily("transformer.blocks", hidden_size="d_model", input_embedding="transformer.wte"),
    "mosaic_gpt": LMFamily("transformer.blocks", hidden_size="d_model", input_embedding="transformer.wte"),
    "opt": LMFamily("model.decoder.layers"),
    "gpt2": LMFamily("transformer.h"),
    "gptj": LMFamily("transformer.h"),
}
DECODER_LAYERS_PATH: dict[str, str] = {name: family.decoder_layers for name, family in LM_FAMILIES.items()}


def _supported_families() -> str:
    return ", ".join(sorted(LM_FAMILIES))


def lm_family(lm: nn.Module) -> LMFamily:
    """The family facts of `lm` (by config.model_type); ValueError naming the class for unsupported LMs."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    family = LM_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"Unsupported language model class {type(lm).__name__} (model_type={model_type!r}): "
            f"Flamingo supports the decoder-only families {_supported_families()}"
        )
    return family


def decoder_layers_path(lm: nn.Module) -> str:
    """The attribute path of `lm`'s decoder-layer list; ValueError naming the class for unsupported LMs."""
    return lm_family(lm).decoder_layers


def _resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ValueError(f"{type(root).__name__} has no attribute path {path!r} for its {what}")
    return module


def get_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's decoder-layer ModuleList (found by family, see `LM_FAMILIES`)."""
    path = decoder_layers_path(lm)
    module = _resolve(lm, path, "decoder layers")
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{type(lm).__name__}.{path} is a {type(module).__name__}, expected nn.ModuleList")
    return module


def lm_hidden_size(lm: nn.Module) -> int:
    """Width of the LM's residual stream: config.hidden_size (MPT / MosaicGPT: config.d_model)."""
    return int(getattr(lm.config, lm_family(lm).hidden_size))


def _input_embedding_at(lm: nn.Module, path: str) -> nn.Module:
    return _resolve(lm, path, "input embedding")


def _set_input_embedding_at(lm: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _resolve(lm, parent_path, "input embedding") if parent_path else lm
    setattr(parent, name, value)


def ensure_input_embedding_accessors(lm: nn.Module) -> nn.Module:
    """Give `lm` get/set_input_embeddings at its family's embedding path when its class lacks them; returns `lm`.

    Some revisions of MosaicGPT (the released 3B's LM) do not define them, so transformers' resize (and our
    splicing) cannot find the embedding; the reference patches the instance the same way (`EmbeddingFnMixin`).
    The accessors are instance attributes holding `functools.partial`s, so copies and pickles of `lm` keep them.
    """
    try:
        lm.get_input_embeddings()
        return lm
    except (NotImplementedError, AttributeError):
        pass
    path = lm_family(lm).input_embedding
    if path is None:
        raise ValueError(
            f"{type(lm).__name__} has no get_input_embeddings() and its family has no known input-embedding path"
        )
    _input_embedding_at(lm, path)  # fail now, naming the path, if it is not there
    lm.get_input_embeddings = functools.partial(_input_embedding_at, lm, path)
    lm.set_input_embeddings = functools.partial(_set_input_embedding_at, lm, path)
    return lm


@dataclass
class MediaConditioning:
    """The media of one call: latents (B, T_img, n, D_vis) and per-token image numbers (B, L) for this step."""

    media: torch.Tensor
    text_time: torch.Tensor | None = None


class MediaContext:
    """Holds the media conditioning of the call in progress, and nothing once it returns.

    Shared by a Flamingo model and its FlamingoLayers. `activate` sets it and restores the previous value in
    `finally`, so an exception or a nested call cannot leave stale media behind.
    """

    def __init__(self) -> None:
        self._current: MediaConditioning | None = None

    @contextlib.contextmanager
    def activate(self, conditioning: MediaConditioning) -> Iterator[MediaConditioning]:
        previous, self._current = self._current, conditioning
        try:
            yield conditioning
        finally:
            self._current = previous

    @property
    def current(self) -> MediaConditioning | None:
        return self._current

    def require(self) -> MediaConditioning:
        if self._current is None or self._current.text_time is None:
            raise RuntimeError(
                "FlamingoLayer called without media conditioning: run the language model through "
                "Flamingo.forward or Flamingo.generate, not directly"
            )
        return self._current


def _checkpointed(fn, *args, enabled: bool, **kwargs):
    """Non-reentrant activation checkpoint of fn(*args, **kwargs) when enabled and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


class FlamingoLayer(nn.Module):
    """A decoder layer with an optional gated cross-attention block run on its input hidden states first.

    Keeps the wrapped layer's call signature and return value: hidden states are the first positional
    argument (or `hidden_states=`), everything else passes through untouched (caches, masks, rotary args).
    Never checkpoint this module itself (it reads the media context); `gradient_checkpointing` checkpoints
    its two children, each with its inputs passed explicitly.
    """

    def __init__(
        self,
        decoder_layer: nn.Module,
        gated_cross_attn_layer: GatedCrossAttentionBlock | None,
        media_context: MediaContext,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.media_context = media_context  # plain object, not a Module: holds no tensors between calls
        self.gradient_checkpointing = gradient_checkpointing

    def __getattr__(self, name: str):
        # LM code may read attributes of its layers (e.g. `attention_type`); answer for the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            decoder_layer = self.__dict__.get("_modules", {}).get("decoder_layer")
            if decoder_layer is None:  # half-built object (copy / unpickling): no fallback
                raise
            return getattr(decoder_layer, name)

    def forward(self, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            conditioning = self.media_context.require()
            if args:
                hidden_states, args = args[0], args[1:]
            else:
                hidden_states = kwargs.pop("hidden_states")
            hidden_states = _checkpointed(
                self.gated_cross_attn_layer,
                hidden_states,  # (B, L, D_lm)
                conditioning.media,  # (B, T_img, n, D_vis)
                conditioning.text_time,  # (B, L)
                enabled=self.gradient_checkpointing,
            )
            args = (hidden_states, *args)
        return _checkpointed(self.decoder_layer, *args, enabled=self.gradient_checkpointing, **kwargs)


def insert_cross_attention(
    lm: nn.Module,
    *,
    vis_dim: int,
    media_context: MediaContext,
    cross_attn_every_n_layers: int = 1,
    gradient_checkpointing: bool = False,
    dim_head: int = 64,
    heads: int = 8,
    per_image_cross_attention: bool = False,
) -> type[nn.Module]:
    """Replace every decoder layer of `lm` (in place) by a FlamingoLayer; returns the original layer class.

    A block goes before layer i when (i + 1) % cross_attn_every_n_layers == 0.
    """
    if cross_attn_every_n_layers < 1:
        raise ValueError(f"cross_attn_every_n_layers must be >= 1, got {cross_attn_every_n_layers}")
    layers = get_decoder_layers(lm)
    if any(isinstance(layer, FlamingoLayer) for layer in layers):
        raise ValueError(f"{type(lm).__name__} already has Flamingo layers")
    dim = lm_hidden_size(lm)
    decoder_layer_class = type(layers[0])
    for i, layer in enumerate(layers):
        block = None
        if (i + 1) % cross_attn_every_n_layers == 0:
            block = GatedCrossAttentionBlock(dim=dim, dim_visual=vis_dim, dim_head=dim_head, heads=heads,
                                             per_image=per_image_cross_attention)  # fmt: skip
        layers[i] = FlamingoLayer(layer, block, media_context, gradient_checkpointing)
    return decoder_layer_class
