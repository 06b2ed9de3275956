"""Recipe composition (training/recipe.py): the released recipes are one base plus small per-size files.

The validated result of each per-size recipe must equal, key for key, the recipe as it was before the split
(tests/fixtures/recipes-before-base/: the three self-contained files of commit 8e1ff9d, with later, deliberate
changes applied to the copies as well: `fsdp_config` moved to FSDP2 with sharded state dicts, and the monitors
`nan_monitor`, `loss_spike`, `xattn_gates` on by default).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flamingo_composer.config_schema import ConfigError
from flamingo_composer.training.config import config_to_dict, load_config
from flamingo_composer.training.recipe import load_recipe_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BEFORE = REPO_ROOT / "tests" / "fixtures" / "recipes-before-base"
SIZES = ["3b", "4b", "9b"]
# What a per-size file may state (SPEC 3's table and the hardware it assumes); everything else lives in the base.
PER_SIZE_KEYS = {
    "base", "variables.num_gpus", "run_name", "model.lm.name", "model.lm.trust_remote_code", "model.tokenizer.name",
    "model.tokenizer.trust_remote_code", "model.cross_attn_every_n_layers", "data.laion.batch_size",
    "data.mmc4.batch_size", "max_duration", "fsdp_config.state_dict_type", "save_interval",
}


def _flat(data, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.update(_flat(value, f"{path}.") if isinstance(value, dict) and value else {path: value})
    return out


@pytest.mark.parametrize("size", SIZES)
def test_per_size_recipe_equals_the_recipe_before_the_split(size):
    now = _flat(config_to_dict(load_config(REPO_ROOT / "yamls" / f"openflamingo-{size}.yaml")))
    before = _flat(config_to_dict(load_config(BEFORE / f"openflamingo-{size}.yaml")))
    assert sorted(now) == sorted(before)
    differing = {key: (now[key], before[key]) for key in now if now[key] != before[key]}
    assert differing == {}


@pytest.mark.parametrize("size", SIZES)
def test_per_size_files_state_only_what_differs(size):
    own = _flat(OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "yamls" / f"openflamingo-{size}.yaml")))
    assert set(own) <= PER_SIZE_KEYS, sorted(set(own) - PER_SIZE_KEYS)
    assert own["base"] == "openflamingo-base.yaml"


def test_bases_merge_in_order_under_the_file_and_resolve_after_the_merge(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\nnested: {p: 1, q: 1}\nname: '${run_name}-a'\nitems: [1, 2]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nnested: {q: 2}\ny: 2\n")
    (tmp_path / "c.yaml").write_text("z: 3\n")
    (tmp_path / "top.yaml").write_text("base: [b.yaml, c.yaml]\nrun_name: top\nnested: {p: 3}\nitems: [9]\n")
    merged = OmegaConf.to_container(load_recipe_yaml(tmp_path / "top.yaml"), resolve=True)
    assert merged == {"x": 1, "nested": {"p": 3, "q": 2}, "name": "top-a", "items": [9], "y": 2, "z": 3,
                      "run_name": "top"}


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "top.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"top.yaml: base not found: .*missing.yaml"):
        load_recipe_yaml(tmp_path / "top.yaml")
    (tmp_path / "one.yaml").write_text("base: two.yaml\n")
    (tmp_path / "two.yaml").write_text("base: one.yaml\n")
    with pytest.raises(ConfigError, match="cycle: .*one.yaml -> .*two.yaml -> .*one.yaml"):
        load_recipe_yaml(tmp_path / "one.yaml")
    (tmp_path / "num.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="base: expected a file name"):
        load_recipe_yaml(tmp_path / "num.yaml")
    (tmp_path / "bad.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base not found"):
        load_config(tmp_path / "bad.yaml")


# Current-backbone recipes: hub models for users; here their settings are validated and the same model is built
# with tiny stand-ins of the same kinds (nothing is downloaded).
CURRENT_RECIPES = {  # file -> (LM name, tiny LM family, tower (source, name), tiny tower, xattn every)
    "qwen3-1.7b-siglip2.yaml": ("Qwen/Qwen3-1.7B-Base", "qwen3", ("open_clip", "ViT-SO400M-14-SigLIP2"),
                                "tiny-siglip2", 2),
    "llama3.2-1b-siglip.yaml": ("meta-llama/Llama-3.2-1B", "llama", ("hf", "google/siglip-so400m-patch14-384"),
                                "tiny-hf-siglip", 1),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CURRENT_RECIPES))
def test_current_backbone_recipes_validate_and_build_with_tiny_stand_ins(name):
    import dataclasses

    import torch
    from step_utils import dual_batch, set_gates, step_losses

    from flamingo_composer.models.factory import TokenizerConfig, build_flamingo
    from flamingo_composer.models.tiny import tiny_lm_config, tiny_vision_config
    from flamingo_composer.training.composer_model import FlamingoComposerModel

    lm_name, family, tower, tiny_tower, every = CURRENT_RECIPES[name]
    cfg = load_config(REPO_ROOT / "yamls" / name)
    model = cfg.model
    assert (model.lm.name, model.tokenizer.name, model.cross_attn_every_n_layers) == (lm_name, lm_name, every)
    assert (model.vision.source, model.vision.name) == tower
    assert model.frozen_dtype == "bfloat16" and cfg.precision == "amp_bf16" and cfg.fsdp_config is not None
    assert (cfg.data["laion"].batch_size, cfg.data["mmc4"].batch_size, cfg.max_duration) == (64, 32, "234375ba")

    tiny = dataclasses.replace(
        model,
        lm=dataclasses.replace(tiny_lm_config(family), attn_implementation=model.lm.attn_implementation),
        tokenizer=TokenizerConfig(builtin="tiny"),
        vision=tiny_vision_config(tiny_tower),
        frozen_dtype=None,  # bf16 weights need CUDA autocast
        perceiver_depth=1, perceiver_num_latents=8, seed=0,
    )  # fmt: skip
    bundle = build_flamingo(tiny)
    set_gates(bundle.model, 0.5)
    composer_model = FlamingoComposerModel(bundle.model)
    batch = dual_batch(bundle.tokenizer)
    step_losses(composer_model, batch)["total"].backward()
    assert bundle.model.perceiver.latents.grad.abs().sum() > 0
    blocks = [m for m in bundle.model.modules() if type(m).__name__ == "GatedCrossAttentionBlock"]
    assert len(blocks) == 2 // every
    assert torch.isfinite(bundle.model.lang_encoder.get_input_embeddings().new_token_rows.grad).all()


def test_the_siglip2_recipe_tower_gives_256_tokens_of_width_1152():
    """open_clip's ViT-SO400M-14-SigLIP2 built on the meta device (no weights read): the tower's real shape."""
    from flamingo_composer.models.towers import build_vision
    from flamingo_composer.models.vision import measure_tower, prepare_vision, vision_block_classes

    vision = load_config(REPO_ROOT / "yamls" / "qwen3-1.7b-siglip2.yaml").model.vision
    tower, transform = build_vision(vision, on_meta=True)
    shape = measure_tower(prepare_vision(tower))
    assert (shape.tokens, shape.width) == (256, 1152)
    assert shape.flops_per_image > 2 * 400e6 * 256  # about 2 x 400M weights x 256 tokens, plus attention
    assert [c.__name__ for c in vision_block_classes(tower)] == ["Block"]
    assert transform.transforms[-1].mean == (0.5, 0.5, 0.5)  # SigLIP's normalisation, from the tower's config


def test_the_mixing_recipe_reads_pairs_obelics_documents_and_mmc4_documents(tmp_path_factory, tmp_path):
    """yamls/mix-datacomp-obelics-mmc4ff.yaml on stand-ins of its three sources (the synthetic pairs and MMC4
    documents, OBELICS-layout parquet converted by the documented command): one batch holds all three, in the
    recipe's forward order, each with its own preprocessing."""
    import itertools

    from train_helpers import small_data

    from flamingo_composer.data.dual_loader import build_dual_loader
    from flamingo_composer.models.embeddings import add_flamingo_tokens
    from flamingo_composer.models.factory import TokenizerConfig, build_tokenizer
    from flamingo_composer.models.tiny import tiny_vision_config
    from flamingo_composer.models.towers import build_vision
    from flamingo_composer.shards.interleaved_parquet import convert_interleaved_parquet
    from flamingo_composer.shards.synthetic_documents import write_synthetic_documents

    synthetic = small_data(tmp_path_factory)
    root = tmp_path / "mds"
    for name, source in (("datacomp", "laion"), ("mmc4-ff", "mmc4")):
        (root / name).mkdir(parents=True)
        (root / name / "train").symlink_to(synthetic / "mds" / source / "train")
    write_synthetic_documents(tmp_path / "obelics.parquet", tmp_path / "images", num_documents=12, words=200)
    report = convert_interleaved_parquet([str(tmp_path / "obelics.parquet")], root / "obelics" / "train",
                                         preset="obelics", image_dir=tmp_path / "images", progress=False)
    assert report.written == 12

    small = ["batch_size=2", "num_workers=0", "preprocess.min_image_bytes=500"]
    overrides = [f"variables.data_root={root}", "data.datacomp.batch_size=4", "data.datacomp.num_workers=0",
                 "device_train_microbatch_size=2", "device=cpu", "precision=fp32", "fsdp_config=null",
                 *[f"data.{name}.{o}" for name in ("obelics", "mmc4ff") for o in small]]  # fmt: skip
    cfg = load_config(REPO_ROOT / "yamls" / "mix-datacomp-obelics-mmc4ff.yaml", overrides)
    assert list(cfg.data) == ["datacomp", "obelics", "mmc4ff"]
    assert [cfg.data[n].kind for n in cfg.data] == ["pairs", "interleaved", "interleaved"]
    assert cfg.data["obelics"].preprocess.layout == "natural" and cfg.data["obelics"].preprocess.max_tokens == 1024
    assert cfg.data.forward_order() == ["obelics", "mmc4ff", "datacomp"]
    assert {n: cfg.data[n].effective_loss_multiplier for n in cfg.data} == {"datacomp": 0.2, "obelics": 1.0,
                                                                            "mmc4ff": 1.0}  # fmt: skip

    tokenizer = build_tokenizer(TokenizerConfig(builtin="tiny"))
    add_flamingo_tokens(tokenizer)
    _, transform = build_vision(tiny_vision_config(), on_meta=True)
    loader = build_dual_loader(cfg.data, tokenizer, transform, rank=0, world_size=1)
    batch = next(itertools.islice(iter(loader), 1))
    loader.close()
    assert list(batch) == ["datacomp", "obelics", "mmc4ff"]
    assert [batch[n]["input_ids"].shape for n in batch] == [(4, 32), (2, 1024), (2, 256)]
    assert all(bool(batch[n]["image_mask"].any(1).all()) for n in batch)  # every row holds an image
