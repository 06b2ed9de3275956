"""Factory and tiny configs: config validation, new tokens, embedding resize (grow and shrink), determinism."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from flamingo_composer.models import (
    FlamingoModelConfig,
    LMConfig,
    TokenizerConfig,
    VisionConfig,
    build_flamingo,
    tiny_model_config,
)
from flamingo_composer.models.embeddings import SplicedEmbedding, add_flamingo_tokens, resize_and_splice
from flamingo_composer.models.factory import build_lm, build_tokenizer, build_vision
from flamingo_composer.models.tiny import TINY_LM_CONFIGS, TINY_VOCAB_SIZE, tiny_lm_config
from flamingo_composer.vocab import build_tiny_tokenizer


def test_tiny_vocab_size_matches_the_builtin_tokenizer():
    assert len(build_tiny_tokenizer()) == TINY_VOCAB_SIZE


def test_new_tokens_are_added_and_looked_up():
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.pad_token is None
    ids = add_flamingo_tokens(tokenizer)
    assert len(tokenizer) == TINY_VOCAB_SIZE + 3
    assert tokenizer.convert_ids_to_tokens([ids["endofchunk"], ids["media"], ids["pad"]]) == [
        "<|endofchunk|>",
        "<image>",
        "<PAD>",
    ]
    assert ids["eos"] == tokenizer.eos_token_id
    assert tokenizer("<image> a red circle <|endofchunk|>").input_ids[0] == ids["media"]
    assert add_flamingo_tokens(tokenizer) == ids and len(tokenizer) == TINY_VOCAB_SIZE + 3  # idempotent

    with_pad = build_tiny_tokenizer()
    with_pad.pad_token = with_pad.eos_token  # an existing pad is kept, no <PAD> added
    assert (
        add_flamingo_tokens(with_pad)["pad"] == with_pad.eos_token_id and len(with_pad) == TINY_VOCAB_SIZE + 2
    )


def test_reference_lm_shrinks_640_to_621_keeping_rows(reference_dir):
    cfg = FlamingoModelConfig(
        vision=VisionConfig(config_path=str(reference_dir / "vision" / "of-tiny-vit-small.json")),
        lm=LMConfig(name=str(reference_dir / "lm")),
        tokenizer=TokenizerConfig(name=str(reference_dir / "lm")),
        cross_attn_every_n_layers=2,
    )
    model, tokenizer, transform = build_flamingo(cfg)
    assert len(tokenizer) == 621
    assert model.special_token_ids == {"media": 619, "endofchunk": 618, "pad": 620, "eos": 0}
    raw = load_file(str(reference_dir / "lm" / "model.safetensors"))
    embedding = model.lang_encoder.get_input_embeddings()
    assert isinstance(embedding, SplicedEmbedding) and embedding.weight.shape == (621, 64)
    assert torch.equal(embedding.weight, raw["gpt_neox.embed_in.weight"][:621])
    assert torch.equal(embedding.new_token_rows, raw["gpt_neox.embed_in.weight"][[618, 619]])
    assert torch.equal(model.lang_encoder.get_output_embeddings().weight, raw["embed_out.weight"][:621])
    assert model.lang_encoder.config.vocab_size == 621
    assert model.vis_dim == 64 and [c.__name__ for c in model.decoder_layer_classes] == ["GPTNeoXLayer"]
    blocks = [layer.gated_cross_attn_layer is not None for layer in model.lang_encoder.gpt_neox.layers]
    assert blocks == [False, True, False, True]
    assert model.perceiver.latents.shape == (64, 64) and len(model.perceiver.layers) == 6
    image = Image.new("RGB", (80, 50), color=(200, 10, 10))
    assert transform(image).shape == (3, 64, 64)


@pytest.mark.parametrize("family, tied", [("mpt", True), ("gpt_neox", False), ("gpt2", True)])
def test_resize_and_splice_keeps_rows_and_ties_the_head(family, tied):
    tokenizer = build_tiny_tokenizer()
    ids = add_flamingo_tokens(tokenizer)
    lm = build_lm(tiny_lm_config(family))
    original = lm.get_input_embeddings().weight.detach().clone()
    kept = min(original.shape[0], len(tokenizer))
    assert (original.shape[0] > len(tokenizer)) == (family == "mpt")  # MPT's padded vocab shrinks
    embedding = resize_and_splice(lm, tokenizer, ids)
    assert embedding.weight.shape == (len(tokenizer), original.shape[1])
    assert torch.equal(embedding.weight[:kept], original[:kept])
    assert not embedding.weight.requires_grad
    head = lm.get_output_embeddings()
    hidden = torch.randn(4, original.shape[1])
    if tied:
        with torch.no_grad():
            embedding.new_token_rows.add_(1.0)
            spliced = embedding(torch.arange(len(tokenizer)))  # (V, D) as looked up
        torch.testing.assert_close(head(hidden), hidden @ spliced.T)
        assert not any(p is embedding.weight for p in head.parameters())  # parameters appear once
    else:
        assert head.weight.shape[0] == len(tokenizer)


def test_config_from_dict_and_omegaconf_round_trip():
    cfg = tiny_model_config("llama", cross_attn_every_n_layers=2)
    assert cfg.lm.config["model_type"] == "llama" and cfg.cross_attn_every_n_layers == 2 and cfg.seed == 0
    as_dict = dataclasses.asdict(cfg)
    assert FlamingoModelConfig.from_dict(as_dict) == cfg
    assert OmegaConf.to_object(OmegaConf.structured(cfg)) == cfg
    with pytest.raises(ValueError, match="model.vision.nmae"):
        FlamingoModelConfig.from_dict({**as_dict, "vision": {"nmae": "ViT-L-14"}})
    with pytest.raises(ValueError, match="model.perceiver_dpeth"):
        FlamingoModelConfig.from_dict({**as_dict, "perceiver_dpeth": 2})


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(
        ValueError, match=r"source: 'open_clip' needs exactly one of \['config_path', 'custom_config', 'name'\]"
    ):
        VisionConfig()
    with pytest.raises(ValueError, match=r"config: does not apply to source 'open_clip'"):
        VisionConfig(config={"model_type": "siglip_vision_model"})
    with pytest.raises(ValueError, match="revision: only applies with source hf and a name"):
        VisionConfig(source="hf", config={"model_type": "siglip_vision_model"}, revision="main")
    with pytest.raises(FileNotFoundError, match="vision.config_path"):
        build_vision(VisionConfig(config_path=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="vision_cfg"):
        build_vision(VisionConfig(custom_config={"embed_dim": 8}))
    with pytest.raises(ValueError, match="model_type"):
        build_lm(LMConfig(config={"hidden_size": 8}))
    with pytest.raises(ValueError, match="exactly one of lm.name"):
        build_lm(LMConfig())
    with pytest.raises(ValueError, match="tokenizer.builtin"):
        build_tokenizer(TokenizerConfig(builtin="huge"))
    with pytest.raises(ValueError, match="unknown tiny LM family"):
        tiny_model_config("bert")


def test_build_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_flamingo(tiny_model_config("gpt_neox", seed=5)).model.state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    b = build_flamingo(tiny_model_config("gpt_neox", seed=5)).model.state_dict()
    c = build_flamingo(tiny_model_config("gpt_neox", seed=6)).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["perceiver.latents"], c["perceiver.latents"])


def test_every_tiny_family_is_small_and_sized_to_the_tokenizer():
    for family, config in TINY_LM_CONFIGS.items():
        lm_cfg = tiny_lm_config(family)
        assert lm_cfg.config == config and lm_cfg.config is not config  # a copy: callers may edit it
        assert config.get("text_config", config)["vocab_size"] >= TINY_VOCAB_SIZE  # gemma3: a composite config
    vision, transform = build_vision(tiny_model_config().vision)
    assert vision.transformer.width == 64 and transform(Image.new("RGB", (40, 40))).shape == (3, 32, 32)


def test_frozen_weights_can_be_stored_in_bfloat16():
    """`frozen_dtype: bfloat16` halves the frozen CLIP and LM weights; trainable ones stay fp32, and every FSDP
    unit holds one dtype (FSDP2 requires it). A forward needs CUDA autocast (amp_bf16), checked by the config."""
    from flamingo_composer.models.tiny import tiny_model_config
    from flamingo_composer.training.composer_model import FlamingoComposerModel
    from flamingo_composer.training.fsdp import install_fsdp_policies, simulate_fsdp_units

    model = build_flamingo(tiny_model_config("mpt", frozen_dtype="bfloat16")).model
    dtypes = {True: set(), False: set()}
    for p in model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {False: {torch.bfloat16}, True: {torch.float32}}
    install_fsdp_policies(FlamingoComposerModel(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    for unit, names in simulate_fsdp_units(model).items():
        assert len({params[n].dtype for n in names}) <= 1, unit


def test_a_pretrained_tag_brings_its_activation_and_preprocessing_without_a_download():
    """ViT-L-14 `openai` (the released models' tower) was trained with QuickGELU, which open_clip 3.3 only warns
    about: the tower must be built with it. A meta-device build (FSDP ranks > 0) gets the tag's preprocessing."""
    from flamingo_composer.models.towers import build_vision

    tower, transform = build_vision(VisionConfig(name="ViT-L-14", pretrained="openai"), on_meta=True)
    assert type(tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    tower, transform = build_vision(VisionConfig(name="ViT-B-16-SigLIP2", pretrained="webli"), on_meta=True)
    assert transform.transforms[-1].mean == (0.5, 0.5, 0.5)
