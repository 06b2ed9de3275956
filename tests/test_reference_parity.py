"""Parity with the reference OpenFlamingo (fixture: one real step of open-flamingo 2.0.1, tiny GPT-NeoX).

Our model, built by the factory from the fixture's LM dir, tokenizer and vision config and loaded from the
reference's `full_state.pt`, must reproduce the reference's losses, logits and greedy generation; the released
`checkpoint.pt` layout must load onto the frozen weights and give the same losses; the loader must name every key
or shape that does not fit. See tests/fixtures/openflamingo-tiny-gptneox/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flamingo_composer.models.factory import (
    FlamingoModelConfig,
    LMConfig,
    TokenizerConfig,
    VisionConfig,
    build_flamingo,
)
from flamingo_composer.models.reference_checkpoint import (
    ReferenceCheckpointError,
    convert_reference_checkpoint,
    load_reference_state_dict,
)
from flamingo_composer.models.reference_images import compact_images

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "openflamingo-tiny-gptneox"

EMBED_IN = "lang_encoder.gpt_neox.embed_in.weight"
DECODER_ALIAS = "lang_encoder.old_decoder_blocks."
XATTN_ALIAS = "lang_encoder.gated_cross_attn_layers."


def fixture_model_config(seed: int) -> FlamingoModelConfig:
    """The fixture's architecture: LM + tokenizer from lm/, the tiny ViT json, xattn every 2, perceiver defaults."""
    return FlamingoModelConfig(
        vision=VisionConfig(config_path=str(REFERENCE_FIXTURE / "vision" / "of-tiny-vit-small.json")),
        lm=LMConfig(name=str(REFERENCE_FIXTURE / "lm")),
        tokenizer=TokenizerConfig(name=str(REFERENCE_FIXTURE / "lm")),
        cross_attn_every_n_layers=2,
        seed=seed,
    )


def new_token_rows_key(model) -> str:
    """Our name of the spliced `<|endofchunk|>`/`<image>` rows parameter (the reference has no such key)."""
    rows = model.lang_encoder.get_input_embeddings().new_token_rows
    return next(name for name, p in model.named_parameters() if p is rows)


def load(name: str):
    return torch.load(REFERENCE_FIXTURE / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((REFERENCE_FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def batch() -> dict:
    return load("batch.pt")


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    return load("full_state.pt")


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return load("checkpoint.pt")


@pytest.fixture(scope="module")
def parity_model(full_state):
    """Our model with every weight from the reference's full state dict (seed 0, like the reference run)."""
    bundle = build_flamingo(fixture_model_config(seed=0))
    report = load_reference_state_dict(bundle.model, full_state)
    return bundle.model.eval(), report


@pytest.fixture(scope="module")
def import_model(full_state):
    """A differently seeded model whose frozen parts equal the reference's: LM from lm/, vision from full_state."""
    model = build_flamingo(fixture_model_config(seed=12345)).model.eval()
    vision_only = {k: v for k, v in full_state.items() if k.startswith("vision_encoder.")}
    load_reference_state_dict(model, vision_only, strict=False)
    return model


def losses(model, batch, datasets=("laion", "mmc4")) -> dict[str, float]:
    with torch.no_grad():
        return {
            name: model(
                *compact_images(sub["vision_x"]), sub["lang_x"], sub["attention_mask"], labels=sub["labels"]
            ).loss.item()
            for name, sub in ((name, batch[name]) for name in datasets)
        }


def wipe_trainable(model) -> None:
    """Zero the perceiver, blocks and new-token rows, so a later check sees only what a load put there."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def generation_inputs(batch, expected):
    """generation_check: the first two LAION images as one (1, 2, 1, 3, 64, 64) input, the given prompt. The
    images stay in the reference's padded form (`compact_images` makes them our model's)."""
    vision_x = batch["laion"]["vision_x"][:2].reshape(1, 2, 1, 3, 64, 64)  # (1, T_img=2, F, C, H, W)
    input_ids = torch.tensor([expected["generation_check"]["prompt_ids"]])  # (1, P)
    return vision_x, input_ids, torch.ones_like(input_ids)


# --------------------------------------------------------------------------------------------- full state


def test_full_state_maps_every_key_and_folds_aliases(parity_model, full_state):
    model, report = parity_model
    assert report.layout == "full"
    assert report.missing == []
    assert set(report.loaded) == set(model.state_dict())  # every model tensor came from the reference
    aliases = sorted(k for k in full_state if k.startswith((DECODER_ALIAS, XATTN_ALIAS)))
    assert len(aliases) == 70  # 4 decoder layers x 12 + 2 blocks x 11
    assert report.aliases_folded == aliases
    state = model.state_dict()
    assert torch.equal(state[EMBED_IN], full_state[EMBED_IN])
    assert report.new_token_rows_from == EMBED_IN
    ids = [model.special_token_ids["endofchunk"], model.special_token_ids["media"]]
    assert torch.equal(
        state[new_token_rows_key(model)], full_state[EMBED_IN][ids]
    )  # (2, D): <|endofchunk|>, <image>
    assert torch.equal(
        state["lang_encoder.gpt_neox.layers.2.decoder_layer.mlp.dense_h_to_4h.bias"],
        full_state["lang_encoder.old_decoder_blocks.2.mlp.dense_h_to_4h.bias"],
    )


@pytest.mark.parametrize("dataset", ["laion", "mmc4"])
def test_losses_and_logits_match_reference(parity_model, batch, expected, dataset):
    model, _ = parity_model
    sub = batch[dataset]
    with torch.no_grad():
        out = model(*compact_images(sub["vision_x"]), sub["lang_x"], sub["attention_mask"], labels=sub["labels"])
    assert out.logits.shape == tuple(expected[dataset]["logits"]["shape"])  # (B, L, len(tokenizer) = 621)
    torch.testing.assert_close(out.logits, sub["logits"], atol=1e-4, rtol=0)
    assert out.loss.item() == pytest.approx(expected[dataset]["loss"], rel=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_reference(parity_model, batch, expected, use_cache):
    model, _ = parity_model
    vision_x, input_ids, attention_mask = generation_inputs(batch, expected)
    out = model.generate(
        *compact_images(vision_x),  # images (2, 3, 64, 64), image_mask (1, 2)
        input_ids,
        attention_mask,
        max_new_tokens=6,
        do_sample=False,
        num_beams=1,
        use_cache=use_cache,
    )
    key = "generated_cached" if use_cache else "generated_no_cache"
    assert out[0, input_ids.shape[1] :].tolist() == expected["generation_check"][key]


def test_cached_step_logits_equal_full_forward_logits(parity_model, batch, expected):
    """Each KV-cached generation step sees the same media as a full forward over the sequence so far."""
    model, _ = parity_model
    vision_x, input_ids, attention_mask = generation_inputs(batch, expected)
    prompt_len = input_ids.shape[1]

    def cached_steps(vision_x):
        out = model.generate(
            *compact_images(vision_x),
            input_ids,
            attention_mask,
            max_new_tokens=6,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return out.sequences, torch.stack(out.logits, dim=1)  # (1, P + 6), (1, 6, V)

    sequences, step_logits = cached_steps(vision_x)
    with torch.no_grad():
        full = model(*compact_images(vision_x), sequences, torch.ones_like(sequences)).logits  # (1, P + 6, V)
    torch.testing.assert_close(step_logits, full[:, prompt_len - 1 : -1], atol=1e-4, rtol=0)
    # The images matter for these steps: swapping the two images changes the cached-step logits.
    _, swapped_logits = cached_steps(vision_x.flip(1))
    assert (swapped_logits - step_logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ released checkpoint


def test_checkpoint_import_reproduces_losses(import_model, batch, checkpoint, expected):
    model = import_model
    trainable_names = {name for name, p in model.named_parameters() if p.requires_grad}
    wipe_trainable(model)
    before = losses(model, batch, datasets=("mmc4",))
    assert before["mmc4"] != pytest.approx(
        expected["import_check"]["losses"]["mmc4"], rel=1e-5
    )  # not loaded yet

    report = load_reference_state_dict(model, checkpoint)
    assert report.layout == "checkpoint"
    assert trainable_names <= set(report.loaded)  # perceiver, blocks and the new-token rows all came from it
    assert not trainable_names & set(report.missing)
    assert all(
        k.startswith("vision_encoder.") or ".decoder_layer." in k or "final_layer_norm" in k
        for k in report.missing
    )  # only frozen CLIP / LM weights stay as built
    ids = [model.special_token_ids["endofchunk"], model.special_token_ids["media"]]
    assert torch.equal(model.state_dict()[new_token_rows_key(model)], checkpoint[EMBED_IN][ids])
    after = losses(model, batch)
    for name, value in expected["import_check"]["losses"].items():
        assert after[name] == pytest.approx(value, rel=1e-5)


def test_convert_gives_trainable_only_state_dict_that_loads_back(import_model, batch, checkpoint, expected):
    model = import_model
    trainable, report = convert_reference_checkpoint(model, checkpoint)
    assert set(trainable) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert new_token_rows_key(model) in trainable and EMBED_IN not in trainable
    assert sum(t.numel() for t in trainable.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )

    wipe_trainable(model)  # then restore the trainable parameters from our own layout
    back = load_reference_state_dict(model, trainable)
    assert back.layout == "checkpoint" and back.new_token_rows_from == new_token_rows_key(model)
    assert sorted(back.loaded) == sorted(trainable)
    for name, value in trainable_state(model).items():
        assert torch.equal(value, trainable[name]), name
    assert losses(model, batch, datasets=("laion",))["laion"] == pytest.approx(
        expected["import_check"]["losses"]["laion"], rel=1e-5
    )


def test_trained_embedding_rows_reach_new_token_rows(import_model, checkpoint):
    """after_step.pt (checkpoint layout, after one reference step) differs from checkpoint.pt only in its trained
    rows 618/619 of the embedding (and the other trainables): those rows must land in our new-token rows."""
    model = import_model
    after_step = load("after_step.pt")
    ids = [model.special_token_ids["endofchunk"], model.special_token_ids["media"]]
    assert not torch.equal(after_step[EMBED_IN][ids], checkpoint[EMBED_IN][ids])
    load_reference_state_dict(model, checkpoint)
    report = load_reference_state_dict(model, after_step)
    assert report.new_token_rows_from == EMBED_IN
    state = model.state_dict()
    assert torch.equal(state[new_token_rows_key(model)], after_step[EMBED_IN][ids])
    assert torch.equal(state[EMBED_IN], after_step[EMBED_IN])
    for key, value in after_step.items():
        assert torch.equal(state[key], value), key


def test_wrapper_prefixes_and_resumable_layout_load(import_model, checkpoint):
    model = import_model
    ddp = {f"module.{k}": v for k, v in checkpoint.items()}
    compiled_fsdp = {
        k.replace("lang_encoder.", "_orig_mod.lang_encoder._fsdp_wrapped_module."): v
        for k, v in checkpoint.items()
    }
    plain = load_reference_state_dict(model, checkpoint).loaded
    assert load_reference_state_dict(model, ddp).loaded == plain
    assert load_reference_state_dict(model, compiled_fsdp).loaded == plain
    assert load_reference_state_dict(model, {"epoch": 3, "model_state_dict": checkpoint}).loaded == plain


def test_import_tool_cli(import_model, checkpoint, tmp_path, capsys):
    from flamingo_composer.cli import import_checkpoint as tool

    with pytest.raises(SystemExit) as help_exit:
        tool.main(["--help"])
    assert help_exit.value.code == 0 and "--checkpoint" in capsys.readouterr().out

    cfg = fixture_model_config(seed=3)
    config_yaml = tmp_path / "model.yaml"
    config_yaml.write_text(
        "model:\n"
        f"  vision: {{config_path: '{cfg.vision.config_path}'}}\n"
        f"  lm: {{name: '{cfg.lm.name}'}}\n"
        f"  tokenizer: {{name: '{cfg.tokenizer.name}'}}\n"
        "  cross_attn_every_n_layers: 2\n"
    )
    out = tmp_path / "trainable.pt"
    args = [
        "--config",
        str(config_yaml),
        "--checkpoint",
        str(REFERENCE_FIXTURE / "checkpoint.pt"),
        "--out",
        str(out),
    ]
    assert tool.main(args) == 0
    written = torch.load(out, weights_only=True)
    expected_trainable, _ = convert_reference_checkpoint(import_model, checkpoint)
    assert written.keys() == expected_trainable.keys()
    for key, value in expected_trainable.items():
        assert torch.equal(written[key], value), key

    bad = tmp_path / "bad.pt"
    torch.save({**checkpoint, "perceiver.extra.weight": torch.zeros(1)}, bad)
    args[3] = str(bad)
    assert tool.main(args) == 1
    assert "perceiver.extra.weight" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- loader errors


def assert_rejected_unchanged(model, source, *fragments, **kwargs):
    """Loading `source` raises one error naming every fragment, and leaves the model as it was."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ReferenceCheckpointError) as err:
        load_reference_state_dict(model, source, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    return str(err.value)


def test_tampered_key_is_named(import_model, checkpoint):
    tampered = dict(checkpoint)
    tampered["perceiver.layers.0.0.to_qq.weight"] = tampered.pop("perceiver.layers.0.0.to_q.weight")
    assert_rejected_unchanged(
        import_model,
        tampered,
        "unexpected key 'perceiver.layers.0.0.to_qq.weight'",
        "'perceiver.layers.0.0.to_q.weight'",
    )  # and the trainable key it left unset


def test_wrong_shapes_are_named_all_at_once(import_model, checkpoint, full_state):
    wrong = dict(checkpoint)
    wrong["perceiver.latents"] = wrong["perceiver.latents"][:32]
    wrong["lang_encoder.gpt_neox.layers.3.gated_cross_attn_layer.ff.1.weight"] = torch.zeros(128, 64)
    assert_rejected_unchanged(
        import_model,
        wrong,
        "'perceiver.latents' is (32, 64), model expects (64, 64)",
        "'lang_encoder.gpt_neox.layers.3.gated_cross_attn_layer.ff.1.weight' is (128, 64), model expects (256, 64)",
        "2 problem(s)",
    )


def test_embedding_row_count_mismatch_is_named(import_model, checkpoint, full_state):
    padded = dict(checkpoint)
    padded[EMBED_IN] = torch.cat(
        [checkpoint[EMBED_IN], torch.zeros(19, 64)]
    )  # (640, 64): an un-resized vocab
    assert_rejected_unchanged(
        import_model,
        padded,
        f"'{EMBED_IN}' is (640, 64), model expects (621, 64)",
        "embedding rows 640 vs 621",
    )


def test_mismatched_alias_is_named(import_model, full_state):
    broken = dict(full_state)
    alias = "lang_encoder.gated_cross_attn_layers.3.attn.to_q.weight"
    broken[alias] = full_state[alias] + 1.0
    assert_rejected_unchanged(
        import_model,
        broken,
        f"alias '{alias}' differs from "
        "'lang_encoder.gpt_neox.layers.3.gated_cross_attn_layer.attn.to_q.weight'",
    )


def test_full_layout_requires_every_tensor(import_model, full_state):
    partial = {k: v for k, v in full_state.items() if k != "vision_encoder.ln_post.bias"}
    assert_rejected_unchanged(
        import_model, partial, "'vision_encoder.ln_post.bias'", "missing from the 'full' layout"
    )


def test_tied_lm_head_key_folds_into_the_spliced_embedding():
    """Tied LMs (MPT, as in the released 3B/9B): the reference lists the head weight under its own name too; it must
    equal the embedding matrix, whose new-token rows (trained in place by the reference) fill our spliced rows."""
    from flamingo_composer.models.tiny import tiny_model_config

    source_model = build_flamingo(tiny_model_config("mpt", seed=1)).model
    target = build_flamingo(tiny_model_config("mpt", seed=2)).model
    embedding = source_model.lang_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[embedding.new_token_ids] += 1.0  # the reference trains these rows inside the matrix
    reference = {k: v for k, v in source_model.state_dict().items() if k != new_token_rows_key(source_model)}
    embed_key = "lang_encoder.transformer.wte.weight"
    reference["lang_encoder.lm_head.weight"] = reference[embed_key]

    report = load_reference_state_dict(target, reference)
    assert report.aliases_folded == ["lang_encoder.lm_head.weight"] and report.missing == []
    assert torch.equal(
        target.lang_encoder.get_input_embeddings().new_token_rows, embedding.weight[embedding.new_token_ids]
    )
    reference["lang_encoder.lm_head.weight"] = reference[embed_key] + 1.0
    assert_rejected_unchanged(
        target, reference, f"alias 'lang_encoder.lm_head.weight' differs from '{embed_key}'"
    )
