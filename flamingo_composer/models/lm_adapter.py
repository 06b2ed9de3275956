"""Find what Flamingo needs in any Hugging Face causal LM, and interleave gated cross-attention with its layers.

No family table: the decoder-layer list is an explicit path (`model.lm.decoder_layers`), else the layer list of
the decoder that `get_decoder()` (or `base_model`) returns, else the one `nn.ModuleList` of the LM whose length is
the text config's layer count. The width comes from the text config (`config.get_text_config()`).

Each decoder layer is replaced by a `FlamingoLayer` (children `decoder_layer`, the original untouched, and
`gated_cross_attn_layer`, a block or None). The layer reads the media of the current call from a
`MediaContext` that `Flamingo.forward` / `generate` activate for exactly the duration of the call, and passes
them to the block as explicit arguments: nothing about one call's images stays on the layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

# Config attributes that hold the layer count / residual width, in the order they are tried (transformers maps
# most families onto the first through `attribute_map`; remote-code LMs such as MosaicGPT use their own names).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd")
# Names a token embedding goes by, to tell it from a position embedding of the same row count (remote code).
TOKEN_EMBEDDING_NAMES = ("wte", "embed_tokens", "word_embeddings", "embed_in", "tok_embeddings")
DECODER_LAYERS_KEY = "model.lm.decoder_layers"


def text_config(lm: nn.Module):
    """The LM's text config: `config.get_text_config()` (a composite config's text part), else `config`."""
    config = lm.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _config_int(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def lm_hidden_size(lm: nn.Module) -> int:
    """Width of the LM's residual stream, from its text config (`hidden_size`; MPT / MosaicGPT: `d_model`)."""
    width = _config_int(text_config(lm), WIDTH_KEYS)
    if width is None:
        raise ValueError(f"{type(lm).__name__}: its config has none of {list(WIDTH_KEYS)} to give the hidden size")
    return width


def lm_decoder(lm: nn.Module) -> nn.Module:
    """The module that maps input ids to the final hidden states (`get_decoder()`, else `base_model`).

    Not `base_model` first: Gemma-3 and Llama-4 text LMs name `language_model` as their base-model prefix but keep
    the decoder under `.model`, so their `base_model` is the causal LM itself.
    """
    get_decoder = getattr(lm, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(AttributeError, NotImplementedError):
            decoder = get_decoder()
            if isinstance(decoder, nn.Module) and decoder is not lm:
                return decoder
    base = getattr(lm, "base_model", None)
    if isinstance(base, nn.Module) and base is not lm:
        return base
    raise ValueError(
        f"{type(lm).__name__}: neither get_decoder() nor base_model gives a decoder module apart from the LM itself"
    )


def no_cache(module: nn.Module) -> dict[str, bool]:
    """`{"use_cache": False}` when `module`'s forward takes `use_cache` (most LMs), else nothing (GPT-1 does not)."""
    parameters = inspect.signature(module.forward).parameters
    takes = "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"use_cache": False} if takes else {}


def _resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ValueError(f"{type(root).__name__} has no attribute path {path!r} for its {what}")
    return module


def _path_of(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def _layer_lists(root: nn.Module, count: int | None, *, direct: bool) -> list[nn.ModuleList]:
    """Non-empty ModuleLists of `root` (its direct children only, or all descendants) of length `count`."""
    modules = root.children() if direct else root.modules()
    return [m for m in modules if isinstance(m, nn.ModuleList) and len(m) > 0 and (count is None or len(m) == count)]


def find_decoder_layers(lm: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(attribute path from the LM's root, ModuleList) of the decoder layers; ValueError naming the class if none.

    Once Flamingo has wrapped them, the list is the one holding `FlamingoLayer`s.
    """
    if path is not None:
        layers = _resolve(lm, path, "decoder layers")
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(lm).__name__}.{path} is a {type(layers).__name__}, expected an nn.ModuleList")
        return path, layers
    wrapped = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and m and isinstance(m[0], FlamingoLayer)]
    if len(wrapped) == 1:
        return _path_of(lm, wrapped[0]), wrapped[0]
    count = _config_int(text_config(lm), LAYER_COUNT_KEYS)
    candidates: list[nn.ModuleList] = []
    with contextlib.suppress(ValueError):
        decoder = lm_decoder(lm)
        candidates = _layer_lists(decoder, count, direct=True) or _layer_lists(decoder, count, direct=False)
        if not candidates:  # the decoder's own single list (Bart-style configs count the encoder's layers)
            candidates = _layer_lists(decoder, None, direct=True)
    if len(candidates) != 1 and count is not None:
        candidates = _layer_lists(lm, count, direct=False)
    if len(candidates) == 1:
        return _path_of(lm, candidates[0]), candidates[0]
    found = ", ".join(f"{_path_of(lm, m)} ({len(m)})" for m in candidates) or "no candidate"
    model_type = getattr(lm.config, "model_type", None)
    raise ValueError(
        f"cannot find the decoder-layer list of {type(lm).__name__} (model_type={model_type!r}, "
        f"{count if count is not None else 'unknown'} layers in its config; found {found}): set {DECODER_LAYERS_KEY} "
        "to its attribute path from the causal LM, e.g. 'model.layers'"
    )


def get_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's decoder-layer ModuleList (see `find_decoder_layers`)."""
    return find_decoder_layers(lm)[1]


def decoder_layers_path(lm: nn.Module) -> str:
    """The attribute path of `lm`'s decoder-layer list (e.g. 'model.layers', 'gpt_neox.layers')."""
    return find_decoder_layers(lm)[0]


def _token_embedding(lm: nn.Module) -> tuple[str, nn.Embedding]:
    """(path, module) of the token embedding of an LM without get_input_embeddings(): the nn.Embedding with one
    row per vocabulary entry (by its usual name when a position embedding has as many rows)."""
    vocab = _config_int(text_config(lm), ("vocab_size",))
    found = [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab]
    if len(found) > 1:
        found = [(n, m) for n, m in found if n.rpartition(".")[2] in TOKEN_EMBEDDING_NAMES]
    if len(found) != 1:
        raise ValueError(
            f"{type(lm).__name__} has no get_input_embeddings() and no single token embedding of {vocab} rows"
        )
    return found[0]


def _input_embedding_at(lm: nn.Module, path: str) -> nn.Module:
    return _resolve(lm, path, "input embedding")


def _set_input_embedding_at(lm: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _resolve(lm, parent_path, "input embedding") if parent_path else lm
    setattr(parent, name, value)


def ensure_input_embedding_accessors(lm: nn.Module) -> nn.Module:
    """Give `lm` get/set_input_embeddings at its token embedding's path when its class lacks them; returns `lm`.

    Some revisions of MosaicGPT (the released 3B's LM) do not define them, so transformers' resize (and our
    splicing) cannot find the embedding; the reference patches the instance the same way (`EmbeddingFnMixin`).
    The embedding is found by its row count (`_token_embedding`). The accessors are instance attributes holding
    `functools.partial`s, so copies and pickles of `lm` keep them.
    """
    try:
        lm.get_input_embeddings()
        return lm
    except (NotImplementedError, AttributeError):
        pass
    path, _ = _token_embedding(lm)
    lm.get_input_embeddings = functools.partial(_input_embedding_at, lm, path)
    lm.set_input_embeddings = functools.partial(_set_input_embedding_at, lm, path)
    return lm


@dataclass
class MediaConditioning:
    """The media of one call: latents (B, T_img, n, D_vis) and per-token image numbers (B, L) for this step, and
    where each image's text lies when the host computed it (`cross_attention.image_segments`)."""

    media: torch.Tensor
    text_time: torch.Tensor | None = None
    segments: tuple[torch.Tensor, torch.Tensor] | None = None


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
                conditioning.segments,  # ((B, T_img, S), (B, T_img, S)) or None
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
    decoder_layers: str | None = None,
    qk_norm: bool = False,
) -> tuple[type[nn.Module], ...]:
    """Replace every decoder layer of `lm` (in place) by a FlamingoLayer; returns the original layer classes.

    A block goes before layer i when (i + 1) % cross_attn_every_n_layers == 0. `decoder_layers`: the layer list's
    attribute path, when it cannot be found (`find_decoder_layers`). Hybrid stacks (e.g. attention and Mamba
    layers) give several classes, in order of first appearance: each is an FSDP and checkpointing unit.
    """
    if cross_attn_every_n_layers < 1:
        raise ValueError(f"cross_attn_every_n_layers must be >= 1, got {cross_attn_every_n_layers}")
    _, layers = find_decoder_layers(lm, decoder_layers)
    if any(isinstance(layer, FlamingoLayer) for layer in layers):
        raise ValueError(f"{type(lm).__name__} already has Flamingo layers")
    dim = lm_hidden_size(lm)
    layer_classes = tuple(dict.fromkeys(type(layer) for layer in layers))
    for i, layer in enumerate(layers):
        block = None
        if (i + 1) % cross_attn_every_n_layers == 0:
            block = GatedCrossAttentionBlock(dim=dim, dim_visual=vis_dim, dim_head=dim_head, heads=heads,
                                             per_image=per_image_cross_attention, qk_norm=qk_norm)  # fmt: skip
        layers[i] = FlamingoLayer(layer, block, media_context, gradient_checkpointing)
    return layer_classes
