"""Build model, tokenizer and image transform from plain (omegaconf-friendly) config dataclasses."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from flamingo_composer.config_schema import from_dict
from flamingo_composer.models.embeddings import add_flamingo_tokens, resize_and_splice
from flamingo_composer.models.flamingo import Flamingo
from flamingo_composer.models.lm_adapter import ensure_input_embedding_accessors, lm_decoder, text_config
from flamingo_composer.models.towers import TorchDtypeName, VisionConfig, build_vision


@dataclass
class LMConfig:
    """Causal LM: `name` (hub id or local dir, from_pretrained) or `config` (inline transformers config, random init).

    `trust_remote_code` lets from_pretrained run the model code shipped with `name` (the released 3B/9B LMs are
    MosaicGPT / MPT remote code, which the reference loads with trust_remote_code=True). `attn_implementation`
    (eager / sdpa / flash_attention_2; HF asks for eager to train Gemma-2/3), `torch_dtype` and `revision` go to
    from_pretrained. `decoder_layers`: the attribute path of the decoder-layer list, for an LM whose list cannot be
    found (lm_adapter.find_decoder_layers). `loss_from_logits`: train on the LM's own logits (models/logits.py).
    """

    name: str | None = None
    config: dict | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    torch_dtype: TorchDtypeName | None = None
    revision: str | None = None
    decoder_layers: str | None = None
    loss_from_logits: bool = False

    def __post_init__(self):
        if self.trust_remote_code and self.config is not None:
            raise ValueError(
                "trust_remote_code: only applies with lm.name (an inline lm.config builds a transformers class)"
            )
        if self.revision is not None and self.config is not None:
            raise ValueError("revision: only applies with lm.name")


@dataclass
class TokenizerConfig:
    """Tokenizer: `name` (hub id or local dir) or `builtin: tiny` (offline word-level tokenizer).

    `trust_remote_code` is passed to AutoTokenizer.from_pretrained with `name`, as the reference does.
    """

    name: str | None = None
    builtin: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.trust_remote_code and self.builtin is not None:
            raise ValueError("trust_remote_code: only applies with tokenizer.name, not tokenizer.builtin")


@dataclass
class FlamingoModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cross_attn_every_n_layers: int = 1
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_num_latents: int = 64
    gradient_checkpointing: bool = False
    seed: int | None = None
    # Storage dtype of the frozen CLIP and LM weights (null: as built, fp32). bfloat16 halves their memory on GPUs;
    # it needs an amp precision (the trainable parameters stay fp32, autocast runs the matmuls in bf16).
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # The cross-attention's exact form: every token against all images' latents behind a mask (the reference's),
    # or each image's text against its own latents only (models/cross_attention.py).
    cross_attention: Literal["masked", "per_image"] = "masked"
    # A LayerNorm over each head's queries and keys in the perceiver and the cross-attention (IDEFICS's
    # `qk_layer_norms`), trainable: for models trained from scratch. The released format has no such weights, so
    # the reference loader and the exporter refuse such a model.
    qk_norm: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlamingoModelConfig:
        """Nested plain dicts -> config; an unknown key or a wrong type raises ConfigError naming `model.<key>`."""
        return from_dict(cls, dict(data), "model")


class FlamingoBundle(NamedTuple):
    model: Flamingo
    tokenizer: Any
    image_transform: Callable


# --------------------------------------------------------------------------------------------- language model


def _load_kwargs(lm: LMConfig) -> dict[str, Any]:
    """The from_pretrained / from_config keywords the config sets (unset ones keep transformers' defaults)."""
    kwargs: dict[str, Any] = {}
    if lm.attn_implementation is not None:
        kwargs["attn_implementation"] = lm.attn_implementation
    if lm.torch_dtype is not None:
        kwargs["torch_dtype"] = lm.torch_dtype if lm.torch_dtype == "auto" else getattr(torch, lm.torch_dtype)
    return kwargs


def build_lm(lm: LMConfig, on_meta: bool = False) -> nn.Module:
    """The causal LM (a multimodal checkpoint's text LM), with input-embedding accessors ensured (some remote-code
    LMs lack them).

    `on_meta` (inside a `torch.device("meta")` context): the architecture from the config, no weights read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (lm.name is None) == (lm.config is None):
        raise ValueError("lm config needs exactly one of lm.name (hub id / local dir) or lm.config (inline config)")
    kwargs = _load_kwargs(lm)
    if lm.name is not None and on_meta:
        config = AutoConfig.from_pretrained(lm.name, trust_remote_code=lm.trust_remote_code, revision=lm.revision)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=lm.trust_remote_code, **kwargs)
    elif lm.name is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                lm.name, trust_remote_code=lm.trust_remote_code, revision=lm.revision, **kwargs
            )
        except ValueError as exc:
            if "trust_remote_code" not in str(exc) or lm.trust_remote_code:
                raise
            raise ValueError(
                f"lm.name {lm.name!r} ships its own model code: set model.lm.trust_remote_code: true to run it"
            ) from exc
    else:
        config = dict(lm.config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("lm.config must contain 'model_type' (e.g. gpt_neox, llama, mpt)")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), **kwargs)
    return ensure_input_embedding_accessors(text_language_model(model))


def text_language_model(model: nn.Module) -> nn.Module:
    """A multimodal conditional-generation model (the Gemma-3 4B/12B/27B releases: `Gemma3ForConditionalGeneration`)
    -> the text-only causal LM of its text config, holding its decoder and head (no copy; the wrapper's own vision
    tower and projector are dropped). Any other LM is returned as it is.
    """
    from transformers import AutoModelForCausalLM

    config = text_config(model)
    if config is model.config:
        return model
    decoder, head = lm_decoder(model), model.get_output_embeddings()
    try:
        with torch.device("meta"):  # a skeleton: every tensor is replaced by the wrapper's below
            text_lm = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"{type(model).__name__} is a multimodal model whose text model (model_type {config.model_type!r}) "
            f"AutoModelForCausalLM cannot build: {exc}"
        ) from exc
    skeleton_decoder = lm_decoder(text_lm)
    slot = next(name for name, child in text_lm.named_children() if child is skeleton_decoder)
    setattr(text_lm, slot, decoder)
    text_lm.set_output_embeddings(head)
    own = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
    left = [n for n, t in itertools.chain(text_lm.named_parameters(), text_lm.named_buffers()) if id(t) not in own]
    if left:
        raise ValueError(
            f"{type(model).__name__}: its text model {type(text_lm).__name__} has tensors outside the decoder and "
            f"head ({left[:5]}), so it cannot be taken out of the multimodal model"
        )
    return text_lm


def build_tokenizer(tokenizer: TokenizerConfig):
    if (tokenizer.name is None) == (tokenizer.builtin is None):
        raise ValueError("tokenizer config needs exactly one of tokenizer.name or tokenizer.builtin")
    if tokenizer.builtin is not None:
        from flamingo_composer.vocab import BUILTIN_TOKENIZERS

        if tokenizer.builtin not in BUILTIN_TOKENIZERS:
            raise ValueError(
                f"tokenizer.builtin {tokenizer.builtin!r} unknown; available: {sorted(BUILTIN_TOKENIZERS)}"
            )
        return BUILTIN_TOKENIZERS[tokenizer.builtin]()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.name, trust_remote_code=tokenizer.trust_remote_code)


# -------------------------------------------------------------------------------------------------- assembly


def build_flamingo(cfg: FlamingoModelConfig | Mapping[str, Any], *, on_meta: bool = False) -> FlamingoBundle:
    """Tokenizer with the new tokens, LM resized to len(tokenizer) with spliced rows, ViT, perceiver, blocks.

    With `cfg.seed` set, every random initialisation happens under that seed (the global RNG is left as it was).
    `on_meta`: every tensor on the meta device and no weight file read: the ranks of an FSDP run other than 0,
    which receive rank 0's weights when Composer shards the model (so a node holds one host copy, not one per GPU).
    """
    if isinstance(cfg, Mapping):
        cfg = FlamingoModelConfig.from_dict(cfg)
    seeded = torch.random.fork_rng(devices=[]) if cfg.seed is not None else contextlib.nullcontext()
    with seeded, torch.device("meta") if on_meta else contextlib.nullcontext():
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer(cfg.tokenizer)
        special_token_ids = add_flamingo_tokens(tokenizer)
        vision_encoder, image_transform = build_vision(cfg.vision, on_meta)
        lang_encoder = build_lm(cfg.lm, on_meta)
        resize_and_splice(lang_encoder, tokenizer, special_token_ids)
        model = Flamingo(
            vision_encoder,
            lang_encoder,
            special_token_ids=special_token_ids,
            cross_attn_every_n_layers=cfg.cross_attn_every_n_layers,
            perceiver_depth=cfg.perceiver_depth,
            perceiver_heads=cfg.perceiver_heads,
            perceiver_dim_head=cfg.perceiver_dim_head,
            perceiver_num_latents=cfg.perceiver_num_latents,
            gradient_checkpointing=cfg.gradient_checkpointing,
            vision_ln_post_on_tokens=cfg.vision.ln_post_on_tokens,
            per_image_cross_attention=cfg.cross_attention == "per_image",
            decoder_layers=cfg.lm.decoder_layers,
            loss_from_logits=cfg.lm.loss_from_logits,
            qk_norm=cfg.qk_norm,
        )
    if cfg.frozen_dtype is not None:
        cast_frozen_weights(model, getattr(torch, cfg.frozen_dtype))
    return FlamingoBundle(model, tokenizer, image_transform)


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every frozen parameter in `dtype` (the trainable ones keep theirs). FSDP units stay one dtype each:
    the wrap policy never mixes frozen and trainable parameters in a unit."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    return model
