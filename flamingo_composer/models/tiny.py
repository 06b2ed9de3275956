"""Named built-in tiny components (offline, deterministic for a seed) for tests and the default CPU run.

`tiny_model_config(family)` gives a FlamingoModelConfig with a tiny ViT, one tiny LM of the family (random
init from an inline transformers config) and the built-in word-level tokenizer (flamingo_composer.vocab).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from flamingo_composer.models.factory import FlamingoModelConfig, LMConfig, TokenizerConfig, VisionConfig

# Size of the built-in tiny tokenizer before the Flamingo tokens are added (2 specials + vocab.WORDS).
TINY_VOCAB_SIZE = 102

TINY_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    # 32 px, patch 8 -> 16 patch tokens of width 64
    "tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    },
    # 64 px, patch 16 -> 16 patch tokens, 4 layers (closer to the reference fixture's ViT)
    "tiny-vit-64": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    },
}

_COMMON = {"bos_token_id": 0, "eos_token_id": 0}

TINY_LM_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt_neox": {
        "model_type": "gpt_neox", "vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 512,
        "rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False, **_COMMON,
    },
    "llama": {
        "model_type": "llama", "vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 512, "tie_word_embeddings": False, **_COMMON,
    },
    "mistral": {
        "model_type": "mistral", "vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 512, "sliding_window": None, "tie_word_embeddings": False, **_COMMON,
    },
    # vocab padded to a multiple of 64 like MPT-1B (50,432): the resize shrinks it, and MPT ties its head.
    "mpt": {
        "model_type": "mpt", "vocab_size": 128, "d_model": 64, "n_layers": 2, "n_heads": 4,
        "expansion_ratio": 4, "max_seq_len": 512, **_COMMON,
    },
    "opt": {
        "model_type": "opt", "vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 512,
        "pad_token_id": 1, **_COMMON,
    },
    "gpt2": {
        "model_type": "gpt2", "vocab_size": TINY_VOCAB_SIZE, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_positions": 512, **_COMMON,
    },
    "gptj": {
        "model_type": "gptj", "vocab_size": TINY_VOCAB_SIZE, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "rotary_dim": 8, "n_positions": 512, "tie_word_embeddings": False, **_COMMON,
    },
}

# Perceiver and cross-attention sizes of the tiny model (the released models use depth 6, 8 heads x 64, 64 latents).
_TINY_PERCEIVER = {"perceiver_depth": 2, "perceiver_heads": 2, "perceiver_dim_head": 32, "perceiver_num_latents": 8}


def tiny_vision_config(name: str = "tiny-vit") -> VisionConfig:
    if name not in TINY_VISION_CONFIGS:
        raise ValueError(f"unknown tiny vision config {name!r}; available: {sorted(TINY_VISION_CONFIGS)}")
    return VisionConfig(custom_config=copy.deepcopy(TINY_VISION_CONFIGS[name]))


def tiny_lm_config(family: str = "gpt_neox") -> LMConfig:
    if family not in TINY_LM_CONFIGS:
        raise ValueError(f"unknown tiny LM family {family!r}; available: {sorted(TINY_LM_CONFIGS)}")
    return LMConfig(config=copy.deepcopy(TINY_LM_CONFIGS[family]))


def tiny_model_config(family: str = "gpt_neox", vision: str = "tiny-vit", **overrides: Any) -> FlamingoModelConfig:
    """Tiny Flamingo config for `family`; `overrides` replace FlamingoModelConfig fields (seed defaults to 0)."""
    cfg = FlamingoModelConfig(
        vision=tiny_vision_config(vision),
        lm=tiny_lm_config(family),
        tokenizer=TokenizerConfig(builtin="tiny"),
        seed=0,
        **_TINY_PERCEIVER,
    )
    return dataclasses.replace(cfg, **overrides)
