"""Named built-in tiny components (offline, deterministic for a seed) for tests and the default CPU run.

`tiny_model_config(family)` gives a FlamingoModelConfig with a tiny ViT, one tiny LM of the family (random
init from an inline transformers config) and the built-in word-level tokenizer (flamingo_composer.vocab).
`TINY_LM_CONFIGS` holds one LM per decoder-only family the trainer is tested on (transformers 4.53), the released
models' families first; `TINY_VISION_CONFIGS` one tower per kind (open_clip ViT, open_clip timm towers in the
shapes of SigLIP2, EVA02 and ConvNeXt, transformers SigLIP and CLIP), all at 32 px.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from flamingo_composer.models.factory import FlamingoModelConfig, LMConfig, TokenizerConfig, VisionConfig

# Size of the built-in tiny tokenizer before the Flamingo tokens are added (2 specials + vocab.WORDS).
TINY_VOCAB_SIZE = 102

_TIMM_TOWER = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_pretrained": False, "timm_proj": "none"}}
_HF_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip

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
    # open_clip timm towers (models/tiny_timm.py): 4x4 tokens of width 64 each
    "tiny-siglip2": {**_TIMM_TOWER, "vision_cfg": {**_TIMM_TOWER["vision_cfg"], "timm_model_name":
                     "flamingo_tiny_siglip2", "timm_pool": "map"}},  # fmt: skip
    "tiny-eva02": {**_TIMM_TOWER, "vision_cfg": {**_TIMM_TOWER["vision_cfg"], "timm_model_name": "flamingo_tiny_eva02",
                   "timm_pool": "token"}},  # fmt: skip
    "tiny-convnext": {**_TIMM_TOWER, "vision_cfg": {**_TIMM_TOWER["vision_cfg"], "timm_model_name":
                      "flamingo_tiny_convnext", "timm_pool": ""}},  # fmt: skip
    # transformers vision models (source: hf)
    "tiny-hf-siglip": {"model_type": "siglip_vision_model", **_HF_VISION},
    "tiny-hf-clip": {"model_type": "clip_vision_model", **_HF_VISION},
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

# Current families: the same small shape (width 64, 2 layers, 4 heads x 16, 2 KV heads), each family's own
# features switched on where they are what the trainer must handle (tied heads, logit steps, scaled embeddings,
# mixtures of experts, parallel / new-architecture blocks).
_SMALL = {"vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512, "pad_token_id": None,
          "tie_word_embeddings": False, **_COMMON}  # fmt: skip
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
_GEMMA3_TEXT = {**_SMALL, "head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True}

TINY_LM_CONFIGS.update({
    "qwen2": {"model_type": "qwen2", **_SMALL},
    "qwen3": {"model_type": "qwen3", **_SMALL, "head_dim": 16},
    "qwen2_moe": {"model_type": "qwen2_moe", **_SMALL, **_MOE, "num_experts": 4,
                  "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"model_type": "qwen3_moe", **_SMALL, **_MOE, "head_dim": 16, "num_experts": 4},
    "gemma": {"model_type": "gemma", **_SMALL, "head_dim": 16, "tie_word_embeddings": True},
    "gemma2": {"model_type": "gemma2", **_SMALL, "head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True},
    "gemma3_text": {"model_type": "gemma3_text", **_GEMMA3_TEXT},
    # a multimodal Gemma-3 checkpoint's layout (Gemma3ForConditionalGeneration): its text LM is taken out
    "gemma3": {"model_type": "gemma3", "text_config": {k: v for k, v in _GEMMA3_TEXT.items() if k != "model_type"},
               "vision_config": {**_HF_VISION, "num_hidden_layers": 1, "image_size": 28, "patch_size": 14},
               "mm_tokens_per_image": 4, "tie_word_embeddings": True, **_COMMON},
    "phi3": {"model_type": "phi3", **_SMALL},
    "phi": {"model_type": "phi", **_SMALL, "partial_rotary_factor": 0.5},
    "olmo2": {"model_type": "olmo2", **_SMALL},
    "smollm3": {"model_type": "smollm3", **_SMALL},
    "stablelm": {"model_type": "stablelm", **_SMALL},
    "falcon": {"model_type": "falcon", **_SMALL, "new_decoder_architecture": True, "num_kv_heads": 2},
    "mixtral": {"model_type": "mixtral", **_SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "glm4": {"model_type": "glm4", **_SMALL, "head_dim": 16},
    "starcoder2": {"model_type": "starcoder2", **_SMALL},
    "deepseek_v3": {"model_type": "deepseek_v3", **_SMALL, **_MOE, "num_key_value_heads": 4, "n_routed_experts": 4,
                    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1},
    "granite": {"model_type": "granite", **_SMALL, "logits_scaling": 4.0},
    "cohere": {"model_type": "cohere", **_SMALL, "logit_scale": 0.25, "tie_word_embeddings": True},
    "llama4_text": {"model_type": "llama4_text", **_SMALL, "head_dim": 16, "num_local_experts": 4,
                    "num_experts_per_tok": 1, "intermediate_size_mlp": 128, "interleave_moe_layer_step": 2},
    "ctrl": {"model_type": "ctrl", "vocab_size": TINY_VOCAB_SIZE, "n_embd": 64, "n_layer": 2, "n_head": 4, "dff": 128,
             "n_positions": 512, **_COMMON},  # a tied head with a bias of its own
    # a hybrid stack: Mamba layers and hybrid (shared attention block + Mamba) layers, two layer classes
    "zamba2": {"model_type": "zamba2", **_SMALL, "num_key_value_heads": 4,
               "layers_block_type": ["mamba", "hybrid"], "hybrid_layer_ids": [1],
               "mamba_d_state": 8, "mamba_headdim": 16, "n_mamba_heads": 8, "attention_head_dim": 16,
               "num_mem_blocks": 1, "adapter_rank": 8, "use_mem_rope": False, "chunk_size": 16},
})  # fmt: skip

# Perceiver and cross-attention sizes of the tiny model (the released models use depth 6, 8 heads x 64, 64 latents).
_TINY_PERCEIVER = {"perceiver_depth": 2, "perceiver_heads": 2, "perceiver_dim_head": 32, "perceiver_num_latents": 8}


def tiny_vision_config(name: str = "tiny-vit") -> VisionConfig:
    if name not in TINY_VISION_CONFIGS:
        raise ValueError(f"unknown tiny vision config {name!r}; available: {sorted(TINY_VISION_CONFIGS)}")
    config = copy.deepcopy(TINY_VISION_CONFIGS[name])
    if "model_type" in config:  # a transformers vision config
        return VisionConfig(source="hf", config=config)
    return VisionConfig(custom_config=config)


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
