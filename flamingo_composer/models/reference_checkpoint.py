"""Load reference OpenFlamingo state dicts (full model or released `checkpoint.pt`) into our `Flamingo`.

Our module names mirror the reference's, so most keys map one-to-one. What needs care:
- the full reference state dict also holds aliases of the same tensors (`lang_encoder.old_decoder_blocks.{i}.*`
  = the decoder layers, `lang_encoder.gated_cross_attn_layers.{i}.*` = the cross-attention blocks): each is checked
  equal to its canonical tensor and folded;
- the reference keeps the whole input-embedding matrix (new-token rows included) in one tensor; we keep the
  `<|endofchunk|>` / `<image>` rows as their own parameter (`SplicedEmbedding.new_token_rows`), so that tensor
  fills both; a tied LM's head weight listed under its own name (`lang_encoder.lm_head.weight`) is one more alias;
- wrappers (`module.` from DDP, `_orig_mod.` from torch.compile, `_fsdp_wrapped_module.` /
  `_checkpoint_wrapped_module.` from FSDP and activation checkpointing) are stripped from both sides.

Everything that does not fit (a key with no home, a shape that differs, an alias that differs from its
canonical tensor, a required parameter left unset) is collected and raised as one error listing all problems.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LoadReport",
    "ReferenceCheckpointError",
    "convert_reference_checkpoint",
    "load_reference_state_dict",
    "read_state_dict",
    "released_state_dict",
]

LAYOUTS = ("auto", "full", "checkpoint")

# Segments inserted into parameter names by wrappers; they never name a real submodule of ours.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# Reference alias containers (ModuleLists on the LM holding the same modules as the decoder-layer list).
_DECODER_ALIAS = "lang_encoder.old_decoder_blocks."
_XATTN_ALIAS = "lang_encoder.gated_cross_attn_layers."
# Our FlamingoLayer children, found in the model's own keys to learn the family's decoder-layer path.
_LAYER_KEY = re.compile(r"^lang_encoder\.(?P<path>.+?)\.(?P<idx>\d+)\.(?:decoder_layer|gated_cross_attn_layer)\.")
_ALIAS_KEY = re.compile(r"^(?P<idx>\d+)\.(?P<rest>.+)$")


class ReferenceCheckpointError(ValueError):
    """A reference state dict does not fit the model; the message lists every problem found."""


QK_NORM_REFUSAL = (
    "the model has qk-norm (model.qk_norm: true: LayerNorms on the queries and keys of the perceiver and the "
    "cross-attention), which the released OpenFlamingo format has no weights for"
)


def qk_norm_keys(model: nn.Module) -> list[str]:
    """The model's qk-norm tensors (`...q_norm.weight`, ...) in the perceiver and the cross-attention blocks, in
    wrapper-free names; none without qk-norm (an LM's own q/k norms, Qwen3's or OLMo 2's, are not Flamingo's)."""
    pattern = re.compile(r"^(perceiver\.|.*\.gated_cross_attn_layer\.).*\.[qk]_norm\.")
    return sorted(k for k in (_clean_key(k) for k in model.state_dict()) if pattern.match(k))


@dataclass
class LoadReport:
    """What a load did, so callers (and the import tool) can print or check it."""

    layout: str  # 'full' or 'checkpoint' (after 'auto' detection)
    source: str  # file path, or '<state dict>'
    loaded: list[str] = field(default_factory=list)  # model keys written
    missing: list[str] = field(default_factory=list)  # model keys left untouched (frozen parts under 'checkpoint')
    aliases_folded: list[str] = field(default_factory=list)  # source alias keys checked equal and dropped
    new_token_rows_from: str | None = None  # source key the new-token rows were taken from

    def summary(self) -> str:
        return (
            f"{self.source}: layout {self.layout!r}, {len(self.loaded)} tensors loaded, "
            f"{len(self.missing)} left as built, {len(self.aliases_folded)} aliases folded, "
            f"new-token rows from {self.new_token_rows_from or 'nowhere'}"
        )


def _clean_key(key: str) -> str:
    """Drop wrapper segments: leading DDP `module.`, and compile/FSDP/checkpoint-wrapper segments anywhere."""
    parts = key.split(".")
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_SEGMENTS)


def read_state_dict(state_dict_or_path, *, name: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Return `(state dict with wrapper-free keys, source name)` from a path or a mapping.

    Accepts a plain state dict (released `checkpoint.pt`, `full_state.pt`) or the reference's resumable
    checkpoint (`{'model_state_dict': ...}`). Files are read with `weights_only=True`.
    """
    if isinstance(state_dict_or_path, str | os.PathLike):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"reference checkpoint {str(path)!r} does not exist")
        source = name or str(path)
        raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
        source = name or "<state dict>"
        raw = state_dict_or_path
    if not isinstance(raw, Mapping):
        raise ReferenceCheckpointError(f"{source}: expected a state dict (a mapping), got {type(raw).__name__}")
    if "model_state_dict" in raw and isinstance(raw["model_state_dict"], Mapping):
        raw = raw["model_state_dict"]
    cleaned: dict[str, torch.Tensor] = {}
    problems = []
    for key, value in raw.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            problems.append(f"key {key!r} holds {type(value).__name__}, not a tensor")
            continue
        if "_flat_param" in key:
            problems.append(
                f"key {key!r} is an FSDP flat parameter: save a full (unsharded) state dict instead"
            )
            continue
        clean = _clean_key(key)
        if clean in cleaned:
            problems.append(f"keys collide after removing wrapper prefixes: {key!r} -> {clean!r}")
            continue
        cleaned[clean] = value
    if problems:
        raise ReferenceCheckpointError(_format_problems(source, problems))
    return cleaned, source


def _format_problems(source: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"cannot load reference state dict {source} ({len(problems)} problem(s)):\n{lines}"


def _decoder_layers_path(model_keys) -> str | None:
    """`gpt_neox.layers`-style path (under `lang_encoder.`) of the wrapped decoder-layer list, from our keys."""
    for key in model_keys:
        match = _LAYER_KEY.match(key)
        if match:
            return match.group("path")
    return None


def _input_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """Clean qualified name and module of the LM's (spliced) input embedding."""
    embedding = model.lang_encoder.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            return _clean_key(name), module
    raise ReferenceCheckpointError("the model's input embedding is not one of its submodules")


def _key_of(tensors: Mapping[str, torch.Tensor], tensor: torch.Tensor | None) -> str | None:
    """The (first) state-dict key holding exactly `tensor` (found by identity, so renames cannot break it)."""
    if tensor is None:
        return None
    return next((key for key, value in tensors.items() if value is tensor), None)


def _output_weight(model: nn.Module) -> torch.Tensor | None:
    head = model.lang_encoder.get_output_embeddings()
    return getattr(head, "weight", None) if head is not None else None


def _tied_head_key(model: nn.Module, embedding: nn.Module) -> str | None:
    """`lang_encoder.lm_head.weight`-style key of a tied output head that has no parameter of its own here.

    Reference state dicts of tied LMs may list the head's weight under its own name; ours reads the spliced
    input embedding instead, so that key is an alias of the embedding weight.
    """
    head = model.lang_encoder.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    for name, module in model.named_modules():
        if module is head and not any(True for _ in module.parameters(recurse=False)):
            return f"{_clean_key(name)}.weight"
    return None


def _new_token_ids(model: nn.Module, embedding: nn.Module) -> list[int]:
    """Token ids whose rows `new_token_rows` holds, in its row order (`<|endofchunk|>`, `<image>`)."""
    ids = getattr(embedding, "new_token_ids", None)
    if ids is None:
        special = model.special_token_ids
        ids = [special["endofchunk"], special["media"]]
    return [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]


def _alias_target(key: str, layers_path: str | None) -> str | None:
    """Canonical key of a reference alias key, or None when `key` is not an alias."""
    for prefix, child in ((_DECODER_ALIAS, "decoder_layer"), (_XATTN_ALIAS, "gated_cross_attn_layer")):
        if key.startswith(prefix):
            match = _ALIAS_KEY.match(key[len(prefix) :])
            if match is None or layers_path is None:
                return ""  # an alias we cannot place: reported as unmapped
            return f"lang_encoder.{layers_path}.{match.group('idx')}.{child}.{match.group('rest')}"
    return None


def _detect_layout(source_keys) -> str:
    return "full" if any(k.startswith("vision_encoder.") for k in source_keys) else "checkpoint"


@dataclass
class _ModelKeys:
    """What the mapping needs to know about the target model, in wrapper-free key names."""

    tensors: dict[str, torch.Tensor]  # clean key -> parameter / buffer
    actual: dict[str, str]  # clean key -> key `model.load_state_dict` expects
    layers_path: str | None  # e.g. 'gpt_neox.layers'
    embed_weight: str  # frozen (V, D) input-embedding matrix
    new_token_rows: str | None  # trainable (K, D) rows of SplicedEmbedding; None if the model has none
    new_token_ids: list[int]  # token ids of those rows, in row order
    vocab: set[str]  # keys with one row per token (input embedding, output head)
    tied_head: str | None  # source-side name of a tied head's weight (an alias of `embed_weight`)

    @classmethod
    def of(cls, model: nn.Module) -> _ModelKeys:
        state = model.state_dict(keep_vars=True)
        actual = {_clean_key(k): k for k in state}
        tensors = {clean: state[k] for clean, k in actual.items()}
        embed_name, embedding = _input_embedding(model)
        # Found by identity: the rows live in their own submodule (an FSDP unit), whatever it is called.
        rows = _key_of(tensors, getattr(embedding, "new_token_rows", None))
        return cls(
            tensors=tensors,
            actual=actual,
            layers_path=_decoder_layers_path(tensors),
            embed_weight=f"{embed_name}.weight",
            new_token_rows=rows,
            new_token_ids=_new_token_ids(model, embedding) if rows is not None else [],
            vocab={f"{embed_name}.weight", _key_of(tensors, _output_weight(model))} - {None},
            tied_head=_tied_head_key(model, embedding),
        )


def _map_keys(source_sd: dict[str, torch.Tensor], keys: _ModelKeys, problems: list[str]):
    """Source keys -> `{model key: (tensor, source key)}` and the folded aliases; misfits go to `problems`."""
    targets: dict[str, tuple[torch.Tensor, str]] = {}
    aliases: list[tuple[str, str]] = []  # (alias source key, canonical key)
    for key, tensor in source_sd.items():
        canonical = keys.embed_weight if key == keys.tied_head else _alias_target(key, keys.layers_path)
        if canonical is not None:
            aliases.append((key, canonical))
        elif key in keys.tensors:
            targets[key] = (tensor, key)
        else:
            problems.append(f"unexpected key {key!r}: the model has no parameter or buffer of that name")

    folded = []
    for key, canonical in aliases:
        tensor = source_sd[key]
        if canonical in source_sd:
            other = source_sd[canonical]
            if other.shape != tensor.shape or not torch.equal(other, tensor):
                problems.append(
                    f"alias {key!r} differs from {canonical!r} (shapes {tuple(tensor.shape)} vs "
                    f"{tuple(other.shape)}): they must hold the same tensor"
                )
            else:
                folded.append(key)
        elif canonical in keys.tensors:
            targets[canonical] = (tensor, key)  # only the alias was saved: it is the value
            folded.append(key)
        else:
            problems.append(f"unexpected key {key!r}: alias of {canonical or '?'!r}, which the model does not have")
    return targets, sorted(folded)


def _shape_problems(targets, keys: _ModelKeys) -> list[str]:
    """One line per shape mismatch, with a hint when an embedding's row count (vocabulary size) differs."""
    problems = []
    for clean, (tensor, src_key) in targets.items():
        want = tuple(keys.tensors[clean].shape)
        if tuple(tensor.shape) == want:
            continue
        hint = ""
        if clean in keys.vocab and tensor.dim() == 2 and tuple(tensor.shape[1:]) == want[1:]:
            hint = (
                f" (embedding rows {tensor.shape[0]} vs {want[0]} = len(tokenizer): the checkpoint was made"
                " with a different tokenizer or an un-resized vocabulary)"
            )
        problems.append(f"shape of {src_key!r} is {tuple(tensor.shape)}, model expects {want}{hint}")
    return problems


def _missing(targets, keys: _ModelKeys) -> list[str]:
    """Model keys no source key provided; tied tensors (same object) count as provided through any name."""
    provided = {id(keys.tensors[k]) for k in targets}
    return sorted(k for k, t in keys.tensors.items() if k not in targets and id(t) not in provided)


def load_reference_state_dict(
    model: nn.Module,
    state_dict_or_path,
    *,
    layout: str = "auto",
    strict: bool | None = None,
) -> LoadReport:
    """Load a reference OpenFlamingo state dict into `model` (our `Flamingo`) and report what was done.

    layout: 'full' = the whole reference model (`full_state.pt`); 'checkpoint' = the released `checkpoint.pt`
    (trainable parameters + every parameter named '*embed*', no vision encoder); 'auto' = 'full' when the
    source holds `vision_encoder.*` keys. Our own trainable-only state dicts load as 'checkpoint'.
    strict: which model tensors must be provided. None (default): all of them for 'full', the trainable ones
    for 'checkpoint' (frozen CLIP/LM weights stay as built). True: all of them. False: none.
    Keys the model has no place for, shape mismatches and differing aliases are always errors; on any error
    nothing is loaded.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    source_sd, source = read_state_dict(state_dict_or_path)
    if layout == "auto":
        layout = _detect_layout(source_sd)
    keys = _ModelKeys.of(model)

    problems: list[str] = []
    targets, folded = _map_keys(source_sd, keys, problems)
    problems += _shape_problems(targets, keys)

    # The reference's single embedding matrix also gives our separate new-token rows (unless given by name).
    rows_from = targets[keys.new_token_rows][1] if keys.new_token_rows in targets else None
    if keys.new_token_rows is not None and rows_from is None and keys.embed_weight in targets:
        weight, src_key = targets[keys.embed_weight]
        if tuple(weight.shape) == tuple(keys.tensors[keys.embed_weight].shape):
            targets[keys.new_token_rows] = (weight[keys.new_token_ids], src_key)  # (K=2, D)
            rows_from = src_key

    missing = _missing(targets, keys)
    qk_norm = qk_norm_keys(model)
    if qk_norm and not any(k in targets for k in qk_norm):  # a released checkpoint: it cannot have them
        raise ReferenceCheckpointError(_format_problems(source, [
            f"{QK_NORM_REFUSAL}: it cannot start from {source}. Set model.qk_norm: false to load a released "
            "checkpoint, or train qk-norm models from scratch"
        ]))  # fmt: skip
    require_all = layout == "full" if strict is None else strict
    if strict is not False:
        required = [
            k for k in missing
            if require_all or (isinstance(keys.tensors[k], nn.Parameter) and keys.tensors[k].requires_grad)
        ]
        if required:
            shown = ", ".join(repr(k) for k in required[:20])
            more = f" and {len(required) - 20} more" if len(required) > 20 else ""
            what = "model tensors" if require_all else "trainable parameters"
            problems.append(f"{len(required)} {what} missing from the {layout!r} layout: {shown}{more}")

    if problems:
        raise ReferenceCheckpointError(_format_problems(source, problems))

    result = model.load_state_dict({keys.actual[k]: t for k, (t, _) in targets.items()}, strict=False)
    if result.unexpected_keys:  # cannot happen: every target key came from the model's own state dict
        raise ReferenceCheckpointError(_format_problems(source, [f"unexpected {result.unexpected_keys}"]))
    return LoadReport(
        layout=layout,
        source=source,
        loaded=sorted(targets),
        missing=missing,
        aliases_folded=folded,
        new_token_rows_from=rows_from,
    )


def convert_reference_checkpoint(
    model: nn.Module, state_dict_or_path, *, layout: str = "auto", strict: bool | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Load a reference checkpoint into `model` and return our trainable-only state dict (and the report).

    The result holds exactly the parameters that train (perceiver, cross-attention blocks, new-token rows) under
    our names; `load_reference_state_dict` accepts it back (our names map to themselves).
    """
    report = load_reference_state_dict(model, state_dict_or_path, layout=layout, strict=strict)
    trainable = {
        _clean_key(name): param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    return trainable, report


def released_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our `Flamingo` -> a state dict in the released `checkpoint.pt` layout, under the reference's key names.

    What the reference's `filter_state_dict_to_trainable` keeps of its own model: every trainable parameter
    (perceiver, gated cross-attention blocks), every parameter whose name contains "embed" (frozen ones too, e.g.
    GPT-NeoX's untied `embed_out`), and the LM's persistent buffers; no vision encoder, no alias keys. The input
    embedding is the whole (V, D) matrix with our trained `<|endofchunk|>` / `<image>` rows written in; a tied head
    listed under its own name (transformers' MPT: `lang_encoder.lm_head.weight`) holds that same tensor.
    Loads back with `load_reference_state_dict` and into the reference's `Flamingo` with `strict=False`. A model
    with qk-norm is refused (ReferenceCheckpointError): the reference would silently run without its norms.
    """
    if qk_norm_keys(model):
        raise ReferenceCheckpointError(f"{QK_NORM_REFUSAL}: the released format cannot hold this model")
    keys = _ModelKeys.of(model)
    out: dict[str, torch.Tensor] = {}
    for clean, tensor in keys.tensors.items():
        if clean.startswith("vision_encoder.") or clean == keys.new_token_rows:
            continue
        if isinstance(tensor, nn.Parameter) and not (
            tensor.requires_grad or "embed" in clean or clean == keys.embed_weight
        ):
            continue  # a frozen LM weight: rebuilt from the LM on load
        out[clean] = tensor.detach().clone()
    if keys.new_token_rows is not None:
        weight = out[keys.embed_weight]  # (V, D), frozen rows as resized
        rows = keys.tensors[keys.new_token_rows].detach()  # (K, D)
        weight[keys.new_token_ids] = rows.to(weight.dtype)
    if keys.tied_head is not None:
        out[keys.tied_head] = out[keys.embed_weight]  # the same tensor, as in the reference's state dict
    return out
