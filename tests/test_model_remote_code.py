"""The released models' remote-code LMs (MosaicGPT for 3B, MPT for 9B), offline, through trust_remote_code.

Tiny stand-ins (tests/tiny_remote_lm.py) are saved with their code and loaded back from a local directory the way
the hub LMs are: their tied logits are computed inside forward as F.linear(x, transformer.wte.weight), and
MosaicGPT has no get_input_embeddings.
"""

import copy

import pytest
import torch
from step_utils import assert_cached_steps_equal_full_forwards, full_images, greedy_steps, set_gates
from tiny_remote_lm import MosaicGPT, MosaicGPTConfig, MPTConfig, MPTForCausalLM
from transformers import PreTrainedModel

from flamingo_composer.models import FlamingoLayer, build_flamingo, get_decoder_layers, tiny_model_config
from flamingo_composer.models.embeddings import (
    SplicedEmbedding,
    TiedLogitsInForward,
    add_flamingo_tokens,
    resize_and_splice,
)
from flamingo_composer.models.factory import LMConfig, TokenizerConfig, build_lm, build_tokenizer
from flamingo_composer.models.reference_checkpoint import load_reference_state_dict
from flamingo_composer.vocab import build_tiny_tokenizer

# variant -> (config class, model class, config kwargs); the MPT one also scales its logits like MPT can.
VARIANTS = {
    "mosaic_gpt": (MosaicGPTConfig, MosaicGPT, {}),
    "mpt": (MPTConfig, MPTForCausalLM, {"logit_scale": 0.5}),
}


@pytest.fixture(scope="module")
def remote_dirs(tmp_path_factory):
    """{variant: local directory with config.json (auto_map), weights and the model's code}."""
    dirs = {}
    for variant, (config_class, model_class, extra) in VARIANTS.items():
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")
        torch.manual_seed(1)
        # vocab padded to 128 > len(tokenizer) = 105, as MPT-1B's 50,432 > 50,280: the resize shrinks it
        lm = model_class(config_class(vocab_size=128, bos_token_id=0, eos_token_id=0, **extra))
        path = tmp_path_factory.mktemp(f"remote_{variant}")
        lm.save_pretrained(path)
        dirs[variant] = path
    return dirs


def lm_config(remote_dirs, variant) -> LMConfig:
    return LMConfig(name=str(remote_dirs[variant]), trust_remote_code=True)


def build_with_bare_lm(remote_dirs, variant):
    """(Flamingo, the same LM resized to len(tokenizer) without Flamingo surgery, tokenizer)."""
    bundle = build_flamingo(tiny_model_config("gpt_neox", lm=lm_config(remote_dirs, variant)))
    bare = build_lm(lm_config(remote_dirs, variant))
    bare.resize_token_embeddings(len(bundle.tokenizer))
    return bundle.model.eval(), bare.eval(), bundle.tokenizer


def set_new_token_rows(model, bare, rows: torch.Tensor) -> None:
    """Give both models the same <|endofchunk|>, <image> rows: ours in new_token_rows, the bare LM's in wte."""
    embedding = model.lang_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.new_token_rows.copy_(rows)
        bare.transformer.wte.weight[embedding.new_token_ids] = rows


def encode(tokenizer, text):
    batch = tokenizer([text], return_tensors="pt")
    return batch.input_ids, batch.attention_mask


def test_remote_code_loads_only_when_trusted(remote_dirs):
    with pytest.raises(ValueError, match=r"model\.lm\.trust_remote_code: true"):
        build_lm(LMConfig(name=str(remote_dirs["mosaic_gpt"])))
    lm = build_lm(lm_config(remote_dirs, "mosaic_gpt"))
    assert type(lm).__name__ == "MosaicGPT" and type(lm).__module__.startswith("transformers_modules.")
    assert type(lm).get_input_embeddings is PreTrainedModel.get_input_embeddings  # the class has none...
    assert lm.get_input_embeddings() is lm.transformer.wte  # ...the family table's path stands in
    copied = copy.deepcopy(lm)
    assert copied.get_input_embeddings() is copied.transformer.wte
    with pytest.raises(ValueError, match="trust_remote_code: only applies with lm.name"):
        LMConfig(config={"model_type": "mpt"}, trust_remote_code=True)
    with pytest.raises(ValueError, match="trust_remote_code: only applies with tokenizer.name"):
        TokenizerConfig(builtin="tiny", trust_remote_code=True)


def test_tokenizer_by_name_takes_trust_remote_code(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path)
    tokenizer = build_tokenizer(TokenizerConfig(name=str(tmp_path), trust_remote_code=True))
    assert len(tokenizer) == len(build_tiny_tokenizer())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_structure_keys_and_trainable_parameters(remote_dirs, variant):
    model, bare, tokenizer = build_with_bare_lm(remote_dirs, variant)
    lm = model.lang_encoder
    layers = get_decoder_layers(lm)
    assert layers is lm.transformer.blocks and all(isinstance(layer, FlamingoLayer) for layer in layers)
    assert model.decoder_layer_classes == (type(layers[0].decoder_layer),)
    assert type(layers[0].decoder_layer).__name__ == "GPTBlock"
    assert layers[0].gated_cross_attn_layer.attn.to_q.in_features == bare.config.d_model == 64
    embedding = lm.transformer.wte
    assert isinstance(embedding, SplicedEmbedding) and lm.get_input_embeddings() is embedding
    assert embedding.weight.shape == (len(tokenizer), 64) and lm.config.vocab_size == len(tokenizer)
    assert torch.equal(embedding.weight, bare.transformer.wte.weight)  # every row exactly as resized
    # MPT's get_output_embeddings is the input embedding itself: still there, not replaced by a head module.
    assert lm.get_output_embeddings() is (embedding if variant == "mpt" else None)
    state = model.state_dict()
    assert "lang_encoder.transformer.wte.weight" in state
    assert "lang_encoder.transformer.wte.trainable_rows.weight" in state
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "lang_encoder.transformer.wte.trainable_rows.weight" in trainable
    assert all(
        n.startswith("perceiver.") or ".gated_cross_attn_layer." in n or n.endswith("trainable_rows.weight")
        for n in trainable
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_gates_equal_the_bare_lm_and_the_tied_logits_use_the_trained_rows(remote_dirs, variant):
    model, bare, tokenizer = build_with_bare_lm(remote_dirs, variant)
    ids, mask = encode(tokenizer, "a red circle <image> the blue square <|endofchunk|> <image> two stars")
    images, image_mask = full_images(1, 2)
    with torch.no_grad():
        ours = model(images, image_mask, ids, mask, labels=ids)
        reference = bare(input_ids=ids, attention_mask=mask, labels=ids)
    assert ours.logits.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-6, rtol=0)

    # New rows, only in our trainable parameter and in the bare LM's full matrix: the logits of every column
    # (the new tokens' included) and the LM's own loss agree again, so the head inside forward used them.
    rows = torch.randn(2, 64)
    set_new_token_rows(model, bare, rows)
    with torch.no_grad():
        moved = model(images, image_mask, ids, mask, labels=ids)
        reference = bare(input_ids=ids, attention_mask=mask, labels=ids)
    new_ids = model.lang_encoder.get_input_embeddings().new_token_ids
    assert (moved.logits[..., new_ids] - ours.logits[..., new_ids]).abs().min() > 1e-4
    # (the new columns come from a separate (K, D) matmul: equal up to float rounding)
    torch.testing.assert_close(moved.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.loss, reference.loss, atol=1e-6, rtol=1e-6)
    assert torch._C._len_torch_function_stack() == 0  # the routing mode left with the call


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_changes_only_the_new_token_rows_through_the_tied_head(remote_dirs, variant):
    model, bare, tokenizer = build_with_bare_lm(remote_dirs, variant)
    model.train()
    embedding = model.lang_encoder.get_input_embeddings()
    # No new token in the input: the rows can only get a gradient through the tied head.
    ids, mask = encode(tokenizer, "a red circle on the blue square")
    images, image_mask = torch.zeros(0, 3, 32, 32), torch.zeros(1, 1, dtype=torch.bool)  # one empty slot
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows_before = embedding.new_token_rows.detach().clone()
    with torch.no_grad():
        logits_before = model(images, image_mask, ids, mask).logits
    loss = model(images, image_mask, ids, mask, labels=ids).loss
    loss.backward()
    assert embedding.new_token_rows.grad.abs().min() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()

    assert "lang_encoder.transformer.wte.weight" in frozen_before
    frozen_after = dict(model.named_parameters())
    assert all(torch.equal(frozen_after[n], t) for n, t in frozen_before.items())  # bitwise, every frozen row
    assert (embedding.new_token_rows - rows_before).abs().min() > 0
    set_gates(model, 0.0)  # the ff gates moved too: close them to compare with the bare LM
    with torch.no_grad():
        logits_after = model(images, image_mask, ids, mask).logits
    new_ids = embedding.new_token_ids
    other = torch.ones(logits_after.shape[-1], dtype=torch.bool)
    other[new_ids] = False
    assert torch.equal(logits_after[..., other], logits_before[..., other])
    assert (logits_after[..., new_ids] - logits_before[..., new_ids]).abs().min() > 1e-4
    set_new_token_rows(model, bare, embedding.new_token_rows.detach())
    with torch.no_grad():
        reference = bare(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits_after, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generate_with_kv_cache_uses_the_images_and_the_trained_rows(remote_dirs, variant):
    model, bare, tokenizer = build_with_bare_lm(remote_dirs, variant)
    set_gates(model, 1.0)
    with torch.no_grad():
        model.lang_encoder.get_input_embeddings().new_token_rows.normal_()
    ids, mask = encode(tokenizer, "<image> a red circle <|endofchunk|> <image> the")
    images, image_mask = full_images(1, 2)
    steps = 4
    out = greedy_steps(model, images, image_mask, ids, mask, steps)
    assert out.sequences.shape == (1, ids.shape[1] + steps)
    assert_cached_steps_equal_full_forwards(model, images, image_mask, ids, out, atol=1e-5, rtol=0)
    swapped = greedy_steps(model, images.flip(0), image_mask, ids, mask, steps)  # one row: its 2 images swapped
    assert (swapped.logits[0] - out.logits[0]).abs().max() > 1e-3
    # With the gates closed, each generated step is the bare LM's, given the same new rows.
    set_gates(model, 0.0)
    set_new_token_rows(model, bare, torch.randn(2, 64))
    with torch.no_grad():
        reference = bare(input_ids=ids, attention_mask=mask).logits[:, -1]  # (1, V)
    torch.testing.assert_close(
        greedy_steps(model, images, image_mask, ids, mask, steps).logits[0], reference, atol=1e-5, rtol=1e-5
    )
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_checkpoint_layout_loads(remote_dirs, variant, tmp_path):
    """A `checkpoint.pt`-style dict (perceiver, blocks under transformer.blocks, the whole wte matrix) loads."""
    source, _, tokenizer = build_with_bare_lm(remote_dirs, variant)
    with torch.no_grad():
        for param in source.parameters():
            if param.requires_grad:
                param.normal_(std=0.5)
    embedding = source.lang_encoder.get_input_embeddings()
    whole_matrix = embedding.weight.detach().clone()
    whole_matrix[embedding.new_token_ids] = (
        embedding.new_token_rows.detach()
    )  # the reference keeps one matrix
    checkpoint = {"lang_encoder.transformer.wte.weight": whole_matrix}
    for name, param in source.named_parameters():
        if name.startswith("perceiver."):
            checkpoint[name] = param.detach().clone()
        elif ".gated_cross_attn_layer." in name:
            checkpoint[name] = param.detach().clone()
            index, rest = name.split("transformer.blocks.")[1].split(".gated_cross_attn_layer.")
            checkpoint[f"lang_encoder.gated_cross_attn_layers.{index}.{rest}"] = (
                param.detach().clone()
            )  # alias
    assert any(k.startswith("lang_encoder.transformer.blocks.1.gated_cross_attn_layer.") for k in checkpoint)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")

    target, _, _ = build_with_bare_lm(remote_dirs, variant)
    report = load_reference_state_dict(target, tmp_path / "checkpoint.pt")
    assert report.layout == "checkpoint"
    assert report.new_token_rows_from == "lang_encoder.transformer.wte.weight"
    assert len(report.aliases_folded) == sum(".gated_cross_attn_layer." in k for k in checkpoint)
    assert torch.equal(target.lang_encoder.get_input_embeddings().new_token_rows, embedding.new_token_rows)
    ids, mask = encode(tokenizer, "<image> a red circle <|endofchunk|> <image> two stars")
    images, image_mask = full_images(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            target(images, image_mask, ids, mask).logits, source(images, image_mask, ids, mask).logits, atol=1e-6,
            rtol=0,
        )


def test_head_that_does_not_read_the_embedding_weight_is_refused():
    """The routing checks that it happened: an LM whose logits bypass wte.weight fails loudly, not silently."""
    tokenizer = build_tiny_tokenizer()
    special_ids = add_flamingo_tokens(tokenizer)
    lm = build_lm(tiny_model_config("gpt_neox").lm)  # untied head `embed_out` with its own weight
    resize_and_splice(lm, tokenizer, special_ids)
    TiedLogitsInForward.install(lm)
    with pytest.raises(RuntimeError, match=r"GPTNeoXForCausalLM: .* F\.linear"):
        lm(input_ids=torch.tensor([[1, 2, 3]]))
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises(IndexError):  # a failing forward also leaves no mode behind
        lm(input_ids=torch.tensor([[10_000]]))
    assert torch._C._len_torch_function_stack() == 0


def test_fsdp_units_keep_frozen_and_trainable_apart(remote_dirs):
    from flamingo_composer.training.composer_model import FlamingoComposerModel
    from flamingo_composer.training.fsdp import install_fsdp_policies, simulate_fsdp_units

    model, _, _ = build_with_bare_lm(remote_dirs, "mosaic_gpt")
    flamingo = install_fsdp_policies(FlamingoComposerModel(model))
    params = dict(flamingo.named_parameters())
    units = simulate_fsdp_units(flamingo)
    assert sum(len(names) for names in units.values()) == len(params)
    for unit, names in units.items():
        assert len({params[n].requires_grad for n in names}) <= 1, unit
    assert {
        "lang_encoder.transformer.blocks.0.decoder_layer",
        "lang_encoder.transformer.wte.trainable_rows",
    } <= set(units)
    assert "lang_encoder.transformer.wte.weight" in units[""]  # the frozen matrix stays in the root unit


def test_activation_checkpointing_gives_the_same_gradients(remote_dirs):
    """Recomputed layers run outside the LM call (no routing mode then): gradients must not change."""
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_model_config(
            "gpt_neox", lm=lm_config(remote_dirs, "mosaic_gpt"), gradient_checkpointing=checkpointing
        )
        model, tokenizer, _ = build_flamingo(cfg)
        set_gates(model, 0.5)
        model.train()
        ids, mask = encode(tokenizer, "<image> a red circle <|endofchunk|> <image> two stars <|endofchunk|>")
        model(*full_images(1, 2, seed=0), ids, mask, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
