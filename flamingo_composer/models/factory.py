"""Build model, tokenizer and image transform from plain (omegaconf-friendly) config dataclasses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from flamingo_composer.config_schema import from_dict
from flamingo_composer.models.embeddings import add_flamingo_tokens, resize_and_splice
from flamingo_composer.models.flamingo import Flamingo
from flamingo_composer.models.lm_adapter import ensure_input_embedding_accessors

# A minimal text tower, filled in for custom vision configs that only describe the ViT (open_clip builds both).
_PLACEHOLDER_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


@dataclass
class VisionConfig:
    """open_clip vision tower: `name` (+ `pretrained` tag, null = random init), or `custom_config`, or `config_path`."""

    name: str | None = None
    pretrained: str | None = None
    custom_config: dict | None = None
    config_path: str | None = None
    ln_post_on_tokens: bool = False


@dataclass
class LMConfig:
    """Causal LM: `name` (hub id or local dir, from_pretrained) or `config` (inline transformers config, random init).

    `trust_remote_code` lets from_pretrained run the model code shipped with `name` (the released 3B/9B LMs are
    MosaicGPT / MPT remote code, which the reference loads with trust_remote_code=True).
    """

    name: str | None = None
    config: dict | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.trust_remote_code and self.config is not None:
            raise ValueError(
                "trust_remote_code: only applies with lm.name (an inline lm.config builds a transformers class)"
            )


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlamingoModelConfig:
        """Nested plain dicts -> config; an unknown key or a wrong type raises ConfigError naming `model.<key>`."""
        return from_dict(cls, dict(data), "model")


class FlamingoBundle(NamedTuple):
    model: Flamingo
    tokenizer: Any
    image_transform: Callable


# ----------------------------------------------------------------------------------------------------- vision


@contextlib.contextmanager
def _registered_open_clip_config(vision: VisionConfig) -> Iterator[str]:
    """Yield the open_clip model name for `vision`, registering a custom config with open_clip if needed."""
    import open_clip

    sources = [k for k in ("name", "custom_config", "config_path") if getattr(vision, k) is not None]
    if len(sources) != 1:
        raise ValueError(
            f"vision config needs exactly one of name / custom_config / config_path, got {sources or 'none'}"
        )
    if vision.name is not None:
        yield vision.name
        return
    if vision.pretrained is not None:
        raise ValueError("vision.pretrained only applies with vision.name (custom configs are randomly initialised)")
    if vision.config_path is not None:
        path = Path(vision.config_path)
        if not path.is_file():
            raise FileNotFoundError(f"vision.config_path {path} does not exist")
        model_cfg = json.loads(path.read_text())
        _check_open_clip_config(model_cfg, f"vision.config_path {path}")
        open_clip.add_model_config(path)
        yield path.stem
        return
    model_cfg = dict(vision.custom_config)
    _check_open_clip_config(model_cfg, "vision.custom_config")
    model_cfg.setdefault("embed_dim", 32)
    model_cfg.setdefault("text_cfg", dict(_PLACEHOLDER_TEXT_CFG))
    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"flamingo-custom-vision-{digest}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
        yield path.stem


def _check_open_clip_config(model_cfg: Any, where: str) -> None:
    if not isinstance(model_cfg, Mapping) or not isinstance(model_cfg.get("vision_cfg"), Mapping):
        raise ValueError(f"{where} must be an open_clip model config with a 'vision_cfg' mapping")


def build_vision(vision: VisionConfig, on_meta: bool = False) -> tuple[nn.Module, Callable]:
    """open_clip `.visual` (the text tower is dropped) and open_clip's eval image transform.

    `on_meta`: shapes only, no weights read (a rank that receives its weights from rank 0).
    """
    import open_clip

    with _registered_open_clip_config(vision) as model_name:
        if on_meta:
            clip, _, eval_transform = open_clip.create_model_and_transforms(model_name, pretrained=None, device="meta")
        else:
            clip, _, eval_transform = open_clip.create_model_and_transforms(model_name, pretrained=vision.pretrained)
    return clip.visual, eval_transform


# --------------------------------------------------------------------------------------------- language model


def build_lm(lm: LMConfig, on_meta: bool = False) -> nn.Module:
    """The causal LM, with input-embedding accessors ensured (some remote-code LMs lack them).

    `on_meta` (inside a `torch.device("meta")` context): the architecture from the config, no weights read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (lm.name is None) == (lm.config is None):
        raise ValueError("lm config needs exactly one of lm.name (hub id / local dir) or lm.config (inline config)")
    if lm.name is not None and on_meta:
        config = AutoConfig.from_pretrained(lm.name, trust_remote_code=lm.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=lm.trust_remote_code)
        return ensure_input_embedding_accessors(model)
    if lm.name is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(lm.name, trust_remote_code=lm.trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" not in str(exc) or lm.trust_remote_code:
                raise
            raise ValueError(
                f"lm.name {lm.name!r} ships its own model code: set model.lm.trust_remote_code: true to run it"
            ) from exc
        return ensure_input_embedding_accessors(model)
    config = dict(lm.config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("lm.config must contain 'model_type' (e.g. gpt_neox, llama, mpt)")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))


def build_tokenizer(tokenizer: TokenizerConfig):
    if (tokenizer.name is None) == (tokenizer.builtin is None):
        raise ValueError("tokenizer config needs exactly one of tokenizer.name or tokenizer.builtin")
    if tokenizer.builtin is not None:
        from flamingo_composer.vocab import BUILTIN_TOKENIZERS

        if tokenizer.builtin not in BUILTIN_TOKENIZERS:
            raise ValueError(f"tokenizer.builtin {tokenizer.builtin!r} unknown; available: {sorted(BUILTIN_TOKENIZERS)}")
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
