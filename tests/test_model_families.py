"""Every supported LM family: structure, gates-0 equality with the bare LM, KV-cache generation, clear errors."""

import copy

import pytest
import torch
from step_utils import assert_cached_steps_equal_full_forwards, greedy_steps, set_gates

from flamingo_composer.models import (
    Flamingo,
    FlamingoLayer,
    build_flamingo,
    get_decoder_layers,
    tiny_model_config,
)
from flamingo_composer.models.embeddings import add_flamingo_tokens, resize_and_splice
from flamingo_composer.models.factory import LMConfig, build_lm, build_tokenizer, build_vision
from flamingo_composer.models.lm_adapter import lm_hidden_size
from flamingo_composer.models.tiny import TINY_LM_CONFIGS

FAMILIES = sorted(TINY_LM_CONFIGS)
LAYERS_PATH = {
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "mpt": "transformer.blocks",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
}


def build_with_bare_lm(family: str, **overrides):
    """A Flamingo model and a copy of its LM taken after the same resize, before any Flamingo surgery."""
    cfg = tiny_model_config(family, **overrides)
    tokenizer = build_tokenizer(cfg.tokenizer)
    special_ids = add_flamingo_tokens(tokenizer)
    vision, _ = build_vision(cfg.vision)
    lm = build_lm(cfg.lm)
    lm.resize_token_embeddings(len(tokenizer))
    bare = copy.deepcopy(lm).eval()
    resize_and_splice(lm, tokenizer, special_ids)
    model = Flamingo(
        vision,
        lm,
        special_token_ids=special_ids,
        cross_attn_every_n_layers=cfg.cross_attn_every_n_layers,
        perceiver_depth=cfg.perceiver_depth,
        perceiver_heads=cfg.perceiver_heads,
        perceiver_dim_head=cfg.perceiver_dim_head,
        perceiver_num_latents=cfg.perceiver_num_latents,
    ).eval()
    return model, bare, tokenizer


def encode(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt")
    assert batch.input_ids.shape[0] == len(texts)
    return batch.input_ids, batch.attention_mask


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_wrapped_with_blocks_every_n(family):
    model, bare, _ = build_with_bare_lm(family, cross_attn_every_n_layers=2)
    layers = get_decoder_layers(model.lang_encoder)
    assert all(isinstance(layer, FlamingoLayer) for layer in layers)
    assert [layer.gated_cross_attn_layer is not None for layer in layers] == [False, True]  # 2 layers, n = 2
    assert model.decoder_layer_class is type(layers[0].decoder_layer)
    assert model.decoder_layer_class.__module__.startswith(f"transformers.models.{family}")
    names = {name for name, _ in model.named_parameters()}
    prefix = f"lang_encoder.{LAYERS_PATH[family]}.1.gated_cross_attn_layer"
    assert {f"{prefix}.attn.to_q.weight", f"{prefix}.attn_gate", f"{prefix}.ff.3.weight"} <= names
    block = layers[1].gated_cross_attn_layer
    assert block.attn.to_q.in_features == lm_hidden_size(bare) == 64
    assert block.attn.to_kv.in_features == model.vis_dim == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_give_the_bare_lm_logits(family):
    model, bare, tokenizer = build_with_bare_lm(family)
    ids, mask = encode(tokenizer, ["a red circle <image> the blue square <|endofchunk|> <image> two stars"])
    vision_x = torch.randn(1, 2, 1, 3, 32, 32)
    with torch.no_grad():
        ours = model(vision_x, ids, mask).logits
        reference = bare(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    # ...and the images do matter once the gates open.
    set_gates(model, 1.0)
    with torch.no_grad():
        assert (model(vision_x, ids, mask).logits - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_step_logits_equal_full_forwards_and_follow_the_images(family):
    model, _, tokenizer = build_with_bare_lm(family)
    set_gates(model, 1.0)
    # The prompts end after their second <image>: generated tokens must keep attending to image 2.
    ids, mask = encode(
        tokenizer,
        ["<image> a red circle <|endofchunk|> <image> the", "<image> two <|endofchunk|> <image> a blue star"],
    )
    ids, mask = ids[:, :6], mask[:, :6]
    vision_x = torch.randn(2, 2, 1, 3, 32, 32)
    steps = 4
    out = greedy_steps(model, vision_x, ids, mask, steps)
    assert out.sequences.shape == (2, ids.shape[1] + steps)
    assert len(out.logits) == steps
    assert_cached_steps_equal_full_forwards(model, vision_x, ids, out, atol=1e-4, rtol=1e-4)

    swapped = greedy_steps(model, vision_x[:, [1, 0]], ids, mask, steps)
    for k in range(steps):
        assert (swapped.logits[k] - out.logits[k]).abs().max() > 1e-4, f"step {k} ignores the images"
    assert model.media_context.current is None


def test_beam_search_expands_media_per_beam():
    model, _, tokenizer = build_with_bare_lm("gpt_neox")
    set_gates(model, 1.0)
    ids, mask = encode(tokenizer, ["<image> a red", "<image> the blue"])
    out = model.generate(
        torch.randn(2, 1, 1, 3, 32, 32),
        ids,
        mask,
        max_new_tokens=3,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
    )
    assert out.shape[0] == 4 and torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("family", ["gpt_neox", "mpt"])
def test_flamingo_layer_passes_other_outputs_through(family):
    model, bare, tokenizer = build_with_bare_lm(family)
    ids, mask = encode(tokenizer, ["<image> a red circle"])
    with torch.no_grad():
        ours = model(torch.randn(1, 1, 1, 3, 32, 32), ids, mask, output_hidden_states=True, use_cache=True)
        reference = bare(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
    assert len(ours.hidden_states) == len(reference.hidden_states) == 3
    for a, b in zip(ours.hidden_states, reference.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert ours.past_key_values is not None


def test_unsupported_lm_names_the_class_and_supported_families():
    cfg = tiny_model_config(
        "gpt_neox",
        lm=LMConfig(
            config={"model_type": "bloom", "vocab_size": 102, "hidden_size": 32, "n_layer": 2, "n_head": 2}
        ),
    )
    with pytest.raises(ValueError, match="BloomForCausalLM") as err:
        build_flamingo(cfg)
    for family in LAYERS_PATH:
        assert family in str(err.value)
