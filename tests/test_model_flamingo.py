"""The assembled Flamingo module: media flow, frozen/trainable split, padded slots, generation, checkpointing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from step_utils import full_images, set_gates

from flamingo_composer.models import Flamingo, build_flamingo, tiny_model_config
from flamingo_composer.models.reference_images import compact_images
from flamingo_composer.models.vision import patch_tokens


def build(family="gpt_neox", **overrides) -> Flamingo:
    model, _, _ = build_flamingo(tiny_model_config(family, **overrides))
    return model


def build_with_tokenizer(family="gpt_neox", **overrides):
    bundle = build_flamingo(tiny_model_config(family, **overrides))
    return bundle.model, bundle.tokenizer


def encode(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch.input_ids, batch.attention_mask


def image_positions(ids, media_id):
    return (ids[0] == media_id).nonzero().flatten().tolist()


def test_model_level_media_mask_only_later_tokens_see_image_j():
    model, tokenizer = build_with_tokenizer()
    model.eval()
    set_gates(model, 1.0)
    ids, mask = encode(tokenizer, ["a red <image> circle on the <image> blue square and <image> a star"])
    positions = image_positions(ids, model.special_token_ids["media"])
    assert len(positions) == 3
    images, image_mask = full_images(1, 3)  # (3, 3, 32, 32), (1, 3)
    with torch.no_grad():
        base = model(images, image_mask, ids, mask).logits[0]  # (L, V)
        for j, pos in enumerate(positions):
            changed = images.clone()
            changed[j] = torch.randn_like(changed[j])
            diff = (model(changed, image_mask, ids, mask).logits[0] - base).abs().amax(dim=-1)  # (L,)
            assert torch.all(diff[:pos] == 0), f"tokens before image {j + 1}'s <image> saw it"
            assert diff[pos] > 1e-5 and diff[-1] > 1e-5, f"image {j + 1} did not reach its text"


def test_forward_returns_hf_output_with_shifted_loss_over_len_tokenizer():
    model, tokenizer = build_with_tokenizer()
    ids, mask = encode(
        tokenizer, ["<image> a red circle <|endofchunk|> <|endoftext|>", "<image> the blue star on top"]
    )
    labels = ids.clone()
    labels[:, 0] = -100
    labels[1, 3:] = -100
    out = model(*full_images(2, 1), ids, mask, labels=labels)
    assert out.logits.shape == (2, ids.shape[1], len(tokenizer))
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, len(tokenizer)), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "family", ["gpt_neox", "mpt"]
)  # untied head, tied head (spliced into the projection)
def test_only_perceiver_blocks_and_new_rows_train_and_frozen_weights_never_move(family):
    model, tokenizer = build_with_tokenizer(family)
    model.train()
    set_gates(model, 0.5)
    ids_map = model.special_token_ids
    embedding = model.lang_encoder.get_input_embeddings()

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        should_train = (
            name.startswith("perceiver.")
            or ".gated_cross_attn_layer." in name
            or p is embedding.new_token_rows
        )
        assert p.requires_grad == should_train, name
    assert any(p is embedding.new_token_rows for p in model.parameters())
    assert embedding.new_token_rows.shape == (2, embedding.weight.shape[1])

    all_ids = torch.arange(len(tokenizer))
    new_ids = torch.tensor([ids_map["endofchunk"], ids_map["media"]])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        effective_before = embedding(all_ids).clone()  # (V, D) rows as the LM sees them

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    ids, mask = encode(tokenizer, ["<image> a red circle <|endofchunk|> <image> blue <|endofchunk|>"])
    out = model(*full_images(1, 2), ids, mask, labels=ids)
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert embedding.new_token_rows.grad.abs().sum(dim=-1).gt(0).all()
    optimizer.step()

    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    with torch.no_grad():
        effective_after = embedding(all_ids)
    unchanged = torch.ones(len(tokenizer), dtype=torch.bool)
    unchanged[new_ids] = False
    assert torch.equal(effective_after[unchanged], effective_before[unchanged])  # original rows and <PAD>
    assert not torch.equal(effective_after[new_ids], effective_before[new_ids])
    assert ids_map["pad"] not in new_ids.tolist()
    if family == "mpt":  # tied: the output projection uses the trained rows too
        hidden = torch.randn(3, embedding.weight.shape[1])
        logits = model.lang_encoder.get_output_embeddings()(hidden)
        torch.testing.assert_close(logits, hidden @ effective_after.T)


def test_empty_image_slots_are_not_encoded_and_change_nothing():
    model, tokenizer = build_with_tokenizer()
    model.eval()
    set_gates(model, 1.0)
    ids, mask = encode(
        tokenizer, ["<image> a red circle <image> a blue star", "<image> a green ring and more text"]
    )
    vision_x = torch.randn(2, 3, 1, 3, 32, 32)  # the reference's padded form
    vision_x[0, 2] = 0  # row 0 has 2 images, row 1 has 1
    vision_x[1, 1:] = 0
    image_mask = torch.tensor([[True, True, False], [True, False, False]])
    images = vision_x[:, :, 0][image_mask]  # (3, 3, 32, 32): the real images in slot order
    every_image = vision_x[:, :, 0].flatten(0, 1)  # (6, 3, 32, 32): the empty slots' zeros as images
    all_slots = torch.ones(2, 3, dtype=torch.bool)
    # The padded form's occupied slots, from the mask or from the slots that are not all zero.
    for compact, mask_of in (compact_images(vision_x, image_mask), compact_images(vision_x)):
        assert torch.equal(compact, images) and torch.equal(mask_of, image_mask)
    with pytest.raises(ValueError, match="image_mask shape"):  # a mask for other slots than vision_x's
        compact_images(vision_x, torch.ones(2, 2, dtype=torch.bool))

    encoded = []
    hook = model.vision_encoder.register_forward_pre_hook(
        lambda module, args: encoded.append(args[0].shape[0])
    )
    try:
        with torch.no_grad():
            from_mask = model(images, image_mask, ids, mask).logits
            assert encoded == [3]
            from_zeros = model(*compact_images(vision_x), ids, mask).logits
            assert encoded == [3, 3]
            every_slot = model(every_image, all_slots, ids, mask).logits
            assert encoded == [3, 3, 6]
            media = model.encode_media(images, image_mask)  # (B, T_img, n, D)
            media_all = model.encode_media(every_image, all_slots)
    finally:
        hook.remove()
    assert torch.equal(from_mask, from_zeros)
    torch.testing.assert_close(from_mask, every_slot, atol=1e-6, rtol=0)
    assert torch.all(media[~image_mask] == 0)
    torch.testing.assert_close(media[image_mask], media_all[image_mask], atol=1e-6, rtol=0)


def test_media_context_is_per_call():
    model, tokenizer = build_with_tokenizer()
    ids, mask = encode(tokenizer, ["<image> a red circle"])
    model(*full_images(1, 1), ids, mask)
    assert model.media_context.current is None
    with pytest.raises(RuntimeError, match="without media conditioning"):
        model.lang_encoder(input_ids=ids)  # nothing left behind by the previous call
    with pytest.raises(ValueError):  # an image mask for 2 rows, the text has 1
        model(*full_images(2, 1), ids, mask)
    assert model.media_context.current is None
    with pytest.raises(ValueError, match="1 images for 2 filled image slots"):  # the mask marks 2, 1 given
        model(torch.randn(1, 3, 32, 32), torch.ones(1, 2, dtype=torch.bool), ids, mask)
    assert model.media_context.current is None


def test_vision_encoder_frozen_eval_no_grad_and_token_semantics():
    model = build(vision="tiny-vit")
    model.train()
    assert model.training and model.perceiver.training and not model.vision_encoder.training
    images = torch.randn(2, 3, 32, 32)
    vit = model.vision_encoder
    tokens = patch_tokens(vit, images)
    assert tokens.shape == (2, 16, 64) and not tokens.requires_grad
    with torch.no_grad():
        trunk = vit.transformer(vit._embeds(images))  # (N, 1 + v, D): CLS first
    torch.testing.assert_close(tokens, trunk[:, 1:], atol=1e-5, rtol=1e-5)  # no ln_post by default

    with_ln = build(vision="tiny-vit")
    with_ln_cfg = tiny_model_config("gpt_neox")
    with_ln_cfg.vision.ln_post_on_tokens = True
    with_ln, _, _ = build_flamingo(with_ln_cfg)
    torch.testing.assert_close(
        patch_tokens(with_ln.vision_encoder, images),
        with_ln.vision_encoder.ln_post(trunk[:, 1:]),
        atol=1e-5,
        rtol=1e-5,
    )
    assert [c.__name__ for c in with_ln.vision_block_classes] == ["ResidualAttentionBlock"]


def test_generate_stops_at_endofchunk_by_default():
    model, tokenizer = build_with_tokenizer()
    model.eval()
    ids, mask = encode(tokenizer, ["<image> a red circle"])
    images, image_mask = full_images(1, 1)
    eoc = model.special_token_ids["endofchunk"]
    with torch.no_grad():
        first = model(images, image_mask, ids, mask).logits[0, -1]
        assert first.max() > 0
        head = model.lang_encoder.get_output_embeddings().weight
        head[eoc] = 50 * head[first.argmax()]  # make <|endofchunk|> the greedy choice
    out = model.generate(images, image_mask, ids, mask, max_new_tokens=5, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == [eoc]
    longer = model.generate(
        images, image_mask, ids, mask, max_new_tokens=5, do_sample=False, eos_token_id=model.special_token_ids["eos"]
    )
    assert longer.shape[1] > out.shape[1] and longer[0, ids.shape[1]] == eoc


def test_gradient_checkpointing_gives_equal_gradients_over_two_forwards():
    plain, tokenizer = build_with_tokenizer(gradient_checkpointing=False)
    ckpt, _ = build_with_tokenizer(gradient_checkpointing=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ckpt.state_dict()[key]), key
    laion_ids, laion_mask = encode(
        tokenizer, ["<image> a red circle <|endofchunk|>", "<image> two blue stars <|endofchunk|>"]
    )
    mmc4_ids, mmc4_mask = encode(
        tokenizer,
        [
            "<image> a red ring <|endofchunk|> <image> the cross",
            "the page <image> a star <|endofchunk|> <image> big",
        ],
    )
    laion_x = full_images(2, 1)
    mmc4_x = (torch.randn(4, 3, 32, 32), torch.tensor([[True, True, False], [True, True, False]]))  # slot 2 empty

    grads, calls = {}, {}
    for label, model in (("plain", plain), ("ckpt", ckpt)):
        model.train()
        set_gates(model, 0.5)
        block = model.lang_encoder.gpt_neox.layers[0].gated_cross_attn_layer
        count = []
        handle = block.register_forward_pre_hook(
            lambda *_, count=count: count.append(1)
        )  # recomputation stops early
        laion = model(*laion_x, laion_ids, laion_mask, labels=laion_ids)  # LAION, then MMC4, then one backward
        mmc4 = model(*mmc4_x, mmc4_ids, mmc4_mask, labels=mmc4_ids)
        (0.2 * laion.loss + mmc4.loss).backward()
        handle.remove()
        calls[label] = len(count)
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert calls == {"plain": 2, "ckpt": 4}  # checkpointing really recomputed each block in backward
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["ckpt"][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_deepcopy_gets_its_own_media_context():
    model, tokenizer = build_with_tokenizer()
    model.eval()
    clone = copy.deepcopy(model)
    assert clone.media_context is not model.media_context
    assert all(layer.media_context is clone.media_context for layer in clone.lang_encoder.gpt_neox.layers)
    ids, mask = encode(tokenizer, ["<image> a red circle"])
    images, image_mask = full_images(1, 1)
    with torch.no_grad():
        assert torch.equal(clone(images, image_mask, ids, mask).logits, model(images, image_mask, ids, mask).logits)
