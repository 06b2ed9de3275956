"""The Flamingo model: frozen vision tower, perceiver resampler, causal LM with gated cross-attention."""

from flamingo_composer.models.cross_attention import (
    GatedCrossAttentionBlock,
    MaskedCrossAttention,
    media_text_time,
)
from flamingo_composer.models.embeddings import SplicedEmbedding, add_flamingo_tokens, resize_and_splice
from flamingo_composer.models.factory import (
    FlamingoBundle,
    FlamingoModelConfig,
    LMConfig,
    TokenizerConfig,
    VisionConfig,
    build_flamingo,
)
from flamingo_composer.models.flamingo import Flamingo
from flamingo_composer.models.lm_adapter import FlamingoLayer, get_decoder_layers
from flamingo_composer.models.perceiver import PerceiverResampler
from flamingo_composer.models.tiny import TINY_LM_CONFIGS, tiny_model_config, tiny_vision_config

__all__ = [
    "TINY_LM_CONFIGS",
    "Flamingo",
    "FlamingoBundle",
    "FlamingoLayer",
    "FlamingoModelConfig",
    "GatedCrossAttentionBlock",
    "LMConfig",
    "MaskedCrossAttention",
    "PerceiverResampler",
    "SplicedEmbedding",
    "TokenizerConfig",
    "VisionConfig",
    "add_flamingo_tokens",
    "build_flamingo",
    "get_decoder_layers",
    "media_text_time",
    "resize_and_splice",
    "tiny_model_config",
    "tiny_vision_config",
]
