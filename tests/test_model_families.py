"""Every tested LM family (tiny random configs of transformers 4.53): structure, gates-0 equality with the bare LM,
the training loss equal to the LM's own loss, a training step, KV-cache generation, export/import, clear errors."""

import copy
from types import SimpleNamespace

import pytest
import torch
from step_utils import (
    assert_cached_steps_equal_full_forwards,
    dual_batch,
    full_images,
    greedy_steps,
    set_gates,
    step_losses,
)

from flamingo_composer.models import (
    Flamingo,
    FlamingoLayer,
    build_flamingo,
    get_decoder_layers,
    tiny_model_config,
)
from flamingo_composer.models.embeddings import add_flamingo_tokens, resize_and_splice
from flamingo_composer.models.factory import LMConfig, build_lm, build_tokenizer, build_vision
from flamingo_composer.models.lm_adapter import decoder_layers_path, find_decoder_layers, lm_hidden_size
from flamingo_composer.models.reference_checkpoint import load_reference_state_dict, released_state_dict
from flamingo_composer.models.tiny import TINY_LM_CONFIGS
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.loss import head_cross_entropy_sum

FAMILIES = list(TINY_LM_CONFIGS)
LAYERS_PATH = {"gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks", "opt": "model.decoder.layers",
               "gpt2": "transformer.h", "gptj": "transformer.h", "falcon": "transformer.h",
               "ctrl": "transformer.h"}  # fmt: skip
# What each family's forward does to the head's logits, or to the looked-up embedding rows.
LOGIT_STEPS = {"gemma2": (("softcap", 30.0),), "granite": (("div", 4.0),), "cohere": (("mul", 0.25),)}
SCALED_EMBEDDING = {"gemma3_text", "gemma3"}
HYBRID = {"zamba2"}


def build_with_bare_lm(family: str, **overrides):
    """A Flamingo model (eval mode) and a copy of its LM taken after the same resize, before any Flamingo surgery."""
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


@pytest.fixture(scope="module")
def shared():
    """family -> (model, bare LM, tokenizer), built once per module: each test sets the gates it needs and leaves
    no gradient behind (a tiny model's build runs its checks, three LM forwards, so the matrix shares them)."""
    built: dict[str, tuple] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_with_bare_lm(family)
        model, _, _ = built[family]
        model.eval().zero_grad(set_to_none=True)
        return built[family]

    return get


def encode(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.input_ids.shape[0] == len(texts)
    return batch.input_ids, batch.attention_mask


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_found_and_wrapped_with_a_block_each(family, shared):
    model, bare, _ = shared(family)
    layers = get_decoder_layers(model.lang_encoder)
    assert all(isinstance(layer, FlamingoLayer) for layer in layers)
    assert all(layer.gated_cross_attn_layer is not None for layer in layers)
    # One class per kind of layer, in order (a hybrid stack, Zamba2: Mamba, then hybrid): each an FSDP unit.
    assert model.decoder_layer_classes == tuple(dict.fromkeys(type(layer.decoder_layer) for layer in layers))
    assert len(model.decoder_layer_classes) == (2 if family in HYBRID else 1)
    assert model.decoder_layer_classes[0].__module__.startswith("transformers.models.")
    path = LAYERS_PATH.get(family, "model.layers")
    assert decoder_layers_path(model.lang_encoder) == path
    names = {name for name, _ in model.named_parameters()}
    prefix = f"lang_encoder.{path}.1.gated_cross_attn_layer"
    assert {f"{prefix}.attn.to_q.weight", f"{prefix}.attn_gate", f"{prefix}.ff.3.weight"} <= names
    block = layers[1].gated_cross_attn_layer
    assert block.attn.to_q.in_features == lm_hidden_size(bare) == 64
    assert block.attn.to_kv.in_features == model.vis_dim == 64
    assert model.logit_transform.steps == LOGIT_STEPS.get(family, ())
    embedding = model.lang_encoder.get_input_embeddings()
    assert (embedding.embed_scale is not None) == (family in SCALED_EMBEDDING)


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3", "zamba2"])
def test_cross_attention_every_second_layer(family):
    model, _, _ = build_with_bare_lm(family, cross_attn_every_n_layers=2)
    layers = get_decoder_layers(model.lang_encoder)
    assert [layer.gated_cross_attn_layer is not None for layer in layers] == [False, True] * (len(layers) // 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_give_the_bare_lm_logits(family, shared):
    model, bare, tokenizer = shared(family)
    set_gates(model, 0.0)
    ids, mask = encode(tokenizer, ["a red circle <image> the blue square <|endofchunk|> <image> two stars"])
    images, image_mask = full_images(1, 2)
    with torch.no_grad():
        ours = model(images, image_mask, ids, mask).logits
        reference = bare(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # ...and the images do matter once the gates open.
    set_gates(model, 1.0)
    with torch.no_grad():
        assert (model(images, image_mask, ids, mask).logits - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_loss_equals_the_lm_own_loss_in_value_and_gradient(family, shared):
    """The training path (final hidden states without the attention mask, the fused head CE with the LM's logit
    steps) against the LM's own loss from its full forward with the mask (HF's shifted token mean), on a
    right-padded batch with images and open gates."""
    model, _, tokenizer = shared(family)
    set_gates(model, 0.5)
    sub = dual_batch(tokenizer, seed=1)["mmc4"]
    inputs = {k: sub[k] for k in ("images", "image_mask", "input_ids", "attention_mask")}
    trainable = [p for p in model.parameters() if p.requires_grad]

    own = model(**inputs, labels=sub["labels"]).loss  # the LM's forward and its own loss
    own_grads = torch.autograd.grad(own, trainable, allow_unused=True)
    # As training runs it: right-padded rows, no attention mask (no real token sees a later position).
    hidden = model(**{**inputs, "attention_mask": None}, final_hidden_states=True)  # (B, L, D)
    supervised = (sub["labels"][:, 1:] != -100).sum()
    ours = head_cross_entropy_sum(hidden, sub["labels"], model.output_head, 16, model.logit_transform) / supervised
    our_grads = torch.autograd.grad(ours, trainable, allow_unused=True)

    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, own_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))
    assert any(g is not None and g.abs().sum() > 0 for g in our_grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_with_images_trains_only_the_trainable_parts(family, shared):
    model, _, tokenizer = shared(family)
    set_gates(model, 0.5)
    composer_model = FlamingoComposerModel(model).train()
    batch = dual_batch(tokenizer)
    losses = step_losses(composer_model, batch)
    assert torch.isfinite(losses["total"]) and losses["total"] > 0
    losses["total"].backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    rows = model.lang_encoder.get_input_embeddings().new_token_rows
    assert rows.grad.abs().sum() > 0
    assert composer_model.flops_per_batch(batch) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_step_logits_equal_full_forwards_and_follow_the_images(family, shared):
    model, _, tokenizer = shared(family)
    set_gates(model, 1.0)
    # The prompts end after their second <image>: generated tokens must keep attending to image 2.
    ids, mask = encode(
        tokenizer,
        ["<image> a red circle <|endofchunk|> <image> the", "<image> two <|endofchunk|> <image> a blue star"],
    )
    ids, mask = ids[:, :6], mask[:, :6]
    images, image_mask = full_images(2, 2)  # (4, 3, 32, 32): row 0's two images, then row 1's
    steps = 4
    out = greedy_steps(model, images, image_mask, ids, mask, steps)
    assert out.sequences.shape == (2, ids.shape[1] + steps)
    assert len(out.logits) == steps
    assert_cached_steps_equal_full_forwards(model, images, image_mask, ids, out, atol=1e-4, rtol=1e-4)

    swapped = greedy_steps(model, images[[1, 0, 3, 2]], image_mask, ids, mask, steps)  # each row's two swapped
    for k in range(steps):
        assert (swapped.logits[k] - out.logits[k]).abs().max() > 1e-4, f"step {k} ignores the images"
    assert model.media_context.current is None


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_round_trips(family, shared):
    """The released checkpoint.pt layout of a trained model loads into one built from the same recipe (the frozen
    weights come from it) whose trainable parameters differ, and gives the trained model's logits."""
    model, _, tokenizer = shared(family)
    trained, fresh = copy.deepcopy(model), copy.deepcopy(model)
    set_gates(trained, 0.7)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)  # as training moves them
    report = load_reference_state_dict(fresh, released_state_dict(trained))
    assert report.layout == "checkpoint"
    for (name, a), b in zip(trained.named_parameters(), fresh.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    ids, _ = encode(tokenizer, ["a <image> red circle <|endofchunk|> <image> two"])
    images, image_mask = full_images(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images, image_mask, ids).logits, trained(images, image_mask, ids).logits)


def test_beam_search_expands_media_per_beam():
    model, _, tokenizer = build_with_bare_lm("gpt_neox")
    set_gates(model, 1.0)
    ids, mask = encode(tokenizer, ["<image> a red", "<image> the blue"])
    out = model.generate(
        *full_images(2, 1),
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
        ours = model(*full_images(1, 1), ids, mask, output_hidden_states=True, use_cache=True)
        reference = bare(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
    assert len(ours.hidden_states) == len(reference.hidden_states) == 3
    for a, b in zip(ours.hidden_states, reference.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert ours.past_key_values is not None


def test_a_multimodal_checkpoint_trains_its_text_lm():
    """model_type gemma3 (Gemma3ForConditionalGeneration, the 4B+ releases) -> its Gemma3ForCausalLM, sharing the
    decoder and head tensors, without the wrapper's own vision tower."""
    lm = build_lm(tiny_model_config("gemma3").lm)
    assert type(lm).__name__ == "Gemma3ForCausalLM"
    assert not any("vision_tower" in name or "multi_modal" in name for name, _ in lm.named_parameters())
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied


class TwoStacks(torch.nn.Module):
    """An LM-like module with no decoder accessor, no layer count in its config and two lists of layers."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="two_stacks", hidden_size=8)
        self.left = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.right = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])


def test_an_lm_without_a_findable_layer_list_names_the_class_and_the_key():
    with pytest.raises(ValueError, match=r"TwoStacks \(model_type='two_stacks'.*model\.lm\.decoder_layers"):
        get_decoder_layers(TwoStacks())
    assert decoder_layers_path_given(TwoStacks(), "right") == ("right", 3)


def decoder_layers_path_given(lm, path):
    found_path, layers = find_decoder_layers(lm, path)
    return found_path, len(layers)


def test_an_explicit_decoder_layers_path_is_used_and_checked():
    cfg = tiny_model_config("llama")
    cfg.lm.decoder_layers = "model.layers"
    assert decoder_layers_path(build_flamingo(cfg).model.lang_encoder) == "model.layers"
    cfg.lm.decoder_layers = "model.norm"
    with pytest.raises(ValueError, match=r"LlamaForCausalLM\.model\.norm is a LlamaRMSNorm, expected an nn.ModuleList"):
        build_flamingo(cfg)


def test_an_lm_that_treats_wrapped_layers_differently_is_refused_at_build():
    """Jamba picks each layer's mask by the layer's class (Mamba or attention): wrapped, its Mamba layers would get
    the attention mask. The build runs the LM with closed gates against its own logits and refuses it, named."""
    jamba = {"model_type": "jamba", "vocab_size": 102, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "num_experts": 2,
             "num_experts_per_tok": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2,
             "attn_layer_offset": 1, "mamba_d_state": 8, "mamba_dt_rank": 8, "use_mamba_kernels": False,
             "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}  # fmt: skip
    with pytest.raises(ValueError, match="JambaForCausalLM: its forward fails once Flamingo wraps its decoder layers"):
        build_flamingo(tiny_model_config("llama", lm=LMConfig(config=jamba)))


def test_a_head_the_fused_loss_cannot_reproduce_is_refused_unless_training_on_the_lm_logits():
    """BERT used as a decoder: its LM head transforms the hidden states before the projection. The build-time
    probe refuses it, naming the class and the key; with `loss_from_logits` the loss is the LM's own."""
    bert = {"model_type": "bert", "vocab_size": 102, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "is_decoder": True, "max_position_embeddings": 512}
    with pytest.raises(ValueError, match=r"BertLMHeadModel: .* does not reproduce .* model\.lm\.loss_from_logits"):
        build_flamingo(tiny_model_config("llama", lm=LMConfig(config=bert)))
    bundle = build_flamingo(tiny_model_config("llama", lm=LMConfig(config=bert, loss_from_logits=True)))
    model = bundle.model.eval()
    assert model.output_head is None  # the training forward returns the LM's logits
    sub = dual_batch(bundle.tokenizer)["laion"]
    composer_model = FlamingoComposerModel(model).train()
    model.eval()  # no dropout, to compare with the LM's own loss
    loss = step_losses(composer_model, {"laion": sub})["laion"]
    own = model(sub["images"], sub["image_mask"], sub["input_ids"], sub["attention_mask"], labels=sub["labels"]).loss
    torch.testing.assert_close(loss, own)
