"""Perceiver resampler and gated cross-attention block against SPEC 1 (shapes, names, media mask)."""

import pytest
import torch

from flamingo_composer.models.cross_attention import (
    GatedCrossAttentionBlock,
    MaskedCrossAttention,
    media_text_time,
)
from flamingo_composer.models.perceiver import FeedForward, PerceiverResampler, attention

IMAGE = 99  # media token id used in these block-level tests


def reference_perceiver_attention(attn, media, latents):
    """SPEC 1's perceiver attention written with an explicit softmax (the reference's einsum form), one image per
    row: media (N, v, D), latents (N, n, D) -> (N, n, D)."""
    h = attn.heads
    media, latents = attn.norm_media(media), attn.norm_latents(latents)
    q = attn.to_q(latents)
    k, v = attn.to_kv(torch.cat((media, latents), dim=-2)).chunk(2, dim=-1)

    def heads(t):  # (N, n, h*d) -> (N, h, n, d)
        b, n, hd = t.shape
        return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3)

    q, k, v = heads(q), heads(k), heads(v)
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
    b, _, n, d = out.shape
    return attn.to_out(out.permute(0, 2, 1, 3).reshape(b, n, h * d))


def reference_masked_cross_attention(attn, x, media, input_ids):
    """The reference's MaskedCrossAttention (only_attend_immediate_media) with an explicit softmax."""
    h = attn.heads
    b, t_img, n, _ = media.shape
    x = attn.norm(x)
    q = attn.to_q(x)
    k, v = attn.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    text_time = (input_ids == IMAGE).cumsum(dim=-1)
    media_time = torch.arange(1, t_img + 1).repeat_interleave(n)
    mask = text_time[:, None, :, None] == media_time[None, None, None, :]
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    attn_weights = sim.softmax(dim=-1).masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("bhij,bhjd->bhid", attn_weights, v).transpose(1, 2).reshape(b, x.shape[1], -1)
    return attn.to_out(out)


def test_perceiver_shapes_names_and_reference_math():
    perceiver = PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5)
    names = {name for name, _ in perceiver.named_parameters()}
    assert "latents" in names and "norm.weight" in names
    for i in range(2):
        for sub in (
            "norm_media.weight",
            "norm_latents.weight",
            "to_q.weight",
            "to_kv.weight",
            "to_out.weight",
        ):
            assert f"layers.{i}.0.{sub}" in names
        assert {f"layers.{i}.1.0.weight", f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"} <= names
    assert not any(name.endswith("bias") and ".to_" in name for name in names)  # bias-free linears
    assert not any("1.1.bias" in name or "1.3.bias" in name for name in names)
    assert perceiver.layers[0][0].to_kv.weight.shape == (2 * 32, 32)  # inner 4 heads x 8 = 32, k and v

    x = torch.randn(6, 6, 32)  # (N, v, D): 6 images of 6 patch tokens
    out = perceiver(x)
    assert out.shape == (6, 5, 32)

    # Same computation with an explicit softmax, step by step.
    latents = perceiver.latents.expand(6, 5, 32)
    media = x
    for attn, ff in perceiver.layers:
        latents = reference_perceiver_attention(attn, media, latents) + latents
        latents = ff(latents) + latents
    torch.testing.assert_close(out, perceiver.norm(latents), atol=1e-5, rtol=1e-5)


def test_perceiver_resamples_each_image_independently():
    perceiver = PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=4)
    x = torch.randn(3, 5, 16)  # (N, v, D)
    changed = x.clone()
    changed[1] += torch.randn(5, 16)  # not a constant shift, which norm_media would remove
    a, b = perceiver(x), perceiver(changed)
    assert not torch.allclose(a[1], b[1])
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], atol=0, rtol=0)


def test_media_text_time_counts_image_tokens_inclusive():
    ids = torch.tensor([[1, IMAGE, 2, 3, IMAGE, 4], [IMAGE, 1, 1, 1, 1, 1]])
    assert media_text_time(ids, IMAGE).tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]


def _block_inputs(t_img=3, n=4, d_vis=12, d_lm=16):
    ids = torch.tensor(
        [
            [1, 2, IMAGE, 3, 4, IMAGE, 5, IMAGE, 6, 7],  # tokens before the first image, then images 1, 2, 3
            [IMAGE, 1, 2, 3, IMAGE, 4, 5, 6, 7, 8],  # image 1 from the start, image 3 never referenced
        ]
    )
    x = torch.randn(2, ids.shape[1], d_lm)
    media = torch.randn(2, t_img, n, d_vis)
    return ids, x, media


def test_attention_over_leading_dims_is_sdpa_without_saving_the_attention_weights():
    """(B, T, h, n, d) inputs: the same values and gradients as SDPA's 5-D call, but through a fused kernel, so the
    graph keeps no (B, T, h, n, m) tensor of attention weights (the math path does)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 16, 8, generator=gen).requires_grad_()  # (B, T, h, n, d)
    k, v = (torch.randn(2, 3, 4, 40, 8, generator=gen).requires_grad_() for _ in range(2))  # (B, T, h, m, d)
    weights = 2 * 3 * 4 * 16 * 40
    outputs, largest = [], []
    for fn in (attention, torch.nn.functional.scaled_dot_product_attention):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            out = fn(q, k, v)  # (B, T, h, n, d)
        outputs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        largest.append(max(saved))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert largest[1] >= weights > largest[0], largest  # 5-D SDPA saves the weights; `attention` does not


def test_feed_forward_equals_its_layers_in_sequence_and_keeps_one_4d_activation():
    """FeedForward (GELU + last Linear as one function that recomputes the GELU in backward) gives the plain
    Sequential's values and gradients, and its graph keeps one (..., 4D) tensor where autograd keeps two."""
    torch.manual_seed(0)
    ff = FeedForward(16, mult=4)
    x = torch.randn(3, 7, 16, requires_grad=True)
    params = [x, *ff.parameters()]
    results, wide = [], []
    for forward in (ff, lambda t: torch.nn.Sequential.forward(ff, t)):  # ours, then the layers one by one
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = forward(x)  # (3, 7, 16)
        results.append((out, *torch.autograd.grad(out.square().sum(), params)))
        wide.append({t.untyped_storage().data_ptr() for t in saved if t.numel() == 3 * 7 * 64})  # (3, 7, 4D)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (len(wide[0]), len(wide[1])) == (1, 2)
    with torch.no_grad():
        assert torch.equal(ff(x), torch.nn.Sequential.forward(ff, x))


def test_masked_cross_attention_matches_reference_and_only_attends_immediate_media():
    attn = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=8, heads=2)
    assert all(m.bias is None for m in (attn.to_q, attn.to_kv, attn.to_out))
    ids, x, media = _block_inputs()
    text_time = media_text_time(ids, IMAGE)
    out = attn(x, media, text_time)  # (B, L, D)
    torch.testing.assert_close(
        out, reference_masked_cross_attention(attn, x, media, ids), atol=1e-5, rtol=1e-5
    )

    # Tokens before the first <image> get exactly zero output.
    assert torch.equal(out[text_time == 0], torch.zeros_like(out[text_time == 0]))
    assert (text_time == 0).sum() == 2

    # Changing image j changes exactly the tokens whose most recent <image> is the j-th.
    for j in range(3):
        changed = media.clone()
        changed[:, j] += torch.randn_like(changed[:, j])
        diff = (attn(x, changed, text_time) - out).abs().amax(dim=-1)  # (B, L)
        affected = text_time == j + 1
        assert torch.all(diff[~affected] == 0), f"image {j + 1} leaked into other tokens"
        assert torch.all(diff[affected] > 1e-6), f"image {j + 1} did not reach its tokens"


def test_gated_block_identity_at_zero_gates_and_gated_when_open():
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=8, heads=2)
    assert block.attn_gate.shape == (1,) and block.ff_gate.shape == (1,)
    assert block.attn_gate.item() == 0.0 and block.ff_gate.item() == 0.0
    names = {name for name, _ in block.named_parameters()}
    assert {
        "attn.norm.weight",
        "attn.to_q.weight",
        "attn.to_kv.weight",
        "attn.to_out.weight",
        "attn_gate",
        "ff.0.weight",
        "ff.1.weight",
        "ff.3.weight",
        "ff_gate",
    } == names - {"attn.norm.bias", "ff.0.bias"}
    ids, x, media = _block_inputs()
    text_time = media_text_time(ids, IMAGE)
    assert torch.equal(block(x, media, text_time), x)

    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.3)
    expected = block.attn(x, media, text_time) * torch.tanh(torch.tensor(0.7)) + x
    expected = block.ff(expected) * torch.tanh(torch.tensor(-0.3)) + expected
    torch.testing.assert_close(block(x, media, text_time), expected)


def test_cross_attention_rejects_mismatched_text_time():
    attn = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=8, heads=2)
    ids, x, media = _block_inputs()
    with pytest.raises(ValueError, match="text_time shape"):
        attn(x, media, media_text_time(ids[:, :-1], IMAGE))


@pytest.mark.parametrize("images", [0, 1, 6])
def test_per_image_cross_attention_equals_the_masked_form(images):
    """Random text with 0, 1 or 6 `<image>` tokens at random places (text before the first, runs of different
    lengths, a slot never referenced), against the reference's masked attention over all T_img x n latents."""
    gen = torch.Generator().manual_seed(images)
    attn = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=8, heads=2, per_image=True)
    b, length, t_img, n = 3, 40, 6, 5
    ids = torch.randint(1, 50, (b, length), generator=gen)
    for row in range(b):
        places = torch.randperm(length - 3, generator=gen)[: max(0, images - row % 2)] + 3  # rows differ
        ids[row, places] = IMAGE
    media = torch.randn(b, t_img, n, 12, generator=gen)
    x = torch.randn(b, length, 16, generator=gen, requires_grad=True)
    out = attn(x, media, media_text_time(ids, IMAGE))  # (B, L, D)
    expected = reference_masked_cross_attention(attn, x, media, ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, attn.to_q.weight, attn.to_kv.weight])
    want = torch.autograd.grad(expected.square().sum(), [x, attn.to_q.weight, attn.to_kv.weight])
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
