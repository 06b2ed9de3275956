"""Label masking (SPEC 2): each rule on hand-made rows, a literal port of the reference loops, and the fixture."""

import torch

from flamingo_composer.data.masking import IGNORE_INDEX, count_supervised_tokens, laion_labels, mmc4_labels
from flamingo_composer.special_tokens import SpecialTokens

# Ids of the reference fixture (its README): endofchunk 618, image 619, pad 620, eos 0.
SPECIAL = SpecialTokens(media=619, endofchunk=618, pad=620, eos=0)
IMG, EOC, PAD, EOS = SPECIAL.media, SPECIAL.endofchunk, SPECIAL.pad, SPECIAL.eos
X = IGNORE_INDEX


def row(*ids):
    return torch.tensor([ids], dtype=torch.long)


def reference_mmc4_loop(input_ids: torch.Tensor) -> torch.Tensor:
    """The reference's per-token loops (open_flamingo 2.0.1 train_utils), kept only as a test oracle."""
    labels = input_ids.clone()
    labels[labels == PAD] = X
    for i in range(labels.shape[0]):
        j = 0
        while j < labels.shape[1] and labels[i][j] != IMG:
            labels[i][j] = X
            j += 1
        for eoc in torch.where(labels[i] == EOC)[0]:
            k = eoc + 1
            while k < labels.shape[1] and labels[i][k] != IMG:
                labels[i][k] = X
                k += 1
    labels[labels == IMG] = X
    return labels


# ---------------------------------------------------------------- LAION


def test_laion_masks_padding_and_image_keeps_caption_eoc_eos():
    ids = row(IMG, 5, 6, 7, EOC, EOS, PAD, PAD)
    assert laion_labels(ids, SPECIAL).tolist() == [[X, 5, 6, 7, EOC, EOS, X, X]]


def test_laion_truncated_row_keeps_every_caption_token():
    ids = row(IMG, 5, 6, 7, 8)
    assert laion_labels(ids, SPECIAL).tolist() == [[X, 5, 6, 7, 8]]


def test_where_pad_equals_eos_the_attention_mask_keeps_the_final_eos_supervised():
    pad_is_eos = SpecialTokens(media=IMG, endofchunk=EOC, pad=EOS, eos=EOS)
    ids = row(IMG, 5, EOC, EOS, EOS, EOS)
    attention = row(1, 1, 1, 1, 0, 0)
    # Masking by pad id (the reference's rule, used without a mask) would also mask the real eos...
    assert laion_labels(ids, pad_is_eos).tolist() == [[X, 5, EOC, X, X, X]]
    # ... the attention mask masks exactly the padded positions, the caption's eos stays supervised.
    assert laion_labels(ids, pad_is_eos, attention).tolist() == [[X, 5, EOC, EOS, X, X]]
    doc = row(7, IMG, 5, EOC, IMG, 6, EOC, EOS, EOS)
    assert mmc4_labels(doc, pad_is_eos, row(1, 1, 1, 1, 1, 1, 1, 1, 0)).tolist() == [[X, X, 5, EOC, X, 6, EOC, X, X]]
    # With a distinct pad the attention mask gives the same labels as the pad id.
    assert laion_labels(row(IMG, 5, EOC, EOS, PAD, PAD), SPECIAL, attention).tolist() == [
        [X, 5, EOC, EOS, X, X]
    ]
    assert laion_labels(row(IMG, 5, 6, 7, 8, 9), SPECIAL, attention).tolist() == [[X, 5, 6, 7, X, X]]


# ---------------------------------------------------------------- MMC4, one rule at a time


def test_mmc4_a_padding():
    assert mmc4_labels(row(IMG, 5, PAD, PAD), SPECIAL).tolist() == [[X, 5, X, X]]


def test_mmc4_b_everything_before_first_image():
    assert mmc4_labels(row(3, 4, 5, IMG, 6, EOC), SPECIAL).tolist() == [[X, X, X, X, 6, EOC]]


def test_mmc4_b_row_without_image_is_all_ignored():
    labels = mmc4_labels(row(3, 4, EOC, 5, EOS, PAD), SPECIAL)
    assert (labels == X).all()


def test_mmc4_c_after_endofchunk_until_next_image():
    ids = row(IMG, 5, EOC, 6, 7, IMG, 8, EOC, EOS, PAD)
    # 6, 7 (text between a chunk end and the next image) and the final eos/pad are masked; <|endofchunk|> is not.
    assert mmc4_labels(ids, SPECIAL).tolist() == [[X, 5, EOC, X, X, X, 8, EOC, X, X]]


def test_mmc4_c_consecutive_endofchunks_and_text_without_closing_chunk():
    ids = row(9, IMG, 5, EOC, EOC, 6, IMG, 7, 8)
    # The second <|endofchunk|> follows another one, so (c) masks it too (as the reference does).
    assert mmc4_labels(ids, SPECIAL).tolist() == [[X, X, 5, EOC, X, X, X, 7, 8]]


def test_mmc4_d_every_image_and_eos_not_supervised():
    ids = row(IMG, IMG, 5, EOC, EOS)
    assert mmc4_labels(ids, SPECIAL).tolist() == [[X, X, 5, EOC, X]]


def test_mmc4_attention_mask_is_applied():
    ids = row(IMG, 5, 6, EOC, EOS, 7)
    assert mmc4_labels(ids, SPECIAL, row(1, 1, 1, 1, 1, 0)).tolist() == [[X, 5, 6, EOC, X, X]]


def test_mmc4_equals_reference_loops_on_random_rows():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.tensor([1, 2, 3, IMG, EOC, EOS, PAD])
    weights = torch.tensor([4.0, 4.0, 4.0, 1.0, 1.0, 0.5, 1.0])
    picks = torch.multinomial(weights, 64 * 40, replacement=True, generator=generator)
    ids = tokens[picks].view(64, 40)  # (B, L)
    assert torch.equal(mmc4_labels(ids, SPECIAL), reference_mmc4_loop(ids))


def test_count_supervised_tokens_counts_shifted_targets():
    labels = torch.tensor([[5, X, 6], [X, 7, 8]])  # position 0 is never a target after shifting
    count = count_supervised_tokens(labels)
    assert count.dtype == torch.long and count.dim() == 0 and int(count) == 3


def test_labels_are_long_and_inputs_untouched():
    ids = row(IMG, 5, EOC, EOS, PAD).int()
    before = ids.clone()
    for fn in (laion_labels, mmc4_labels):
        labels = fn(ids, SPECIAL)
        assert labels.dtype == torch.long and labels.shape == ids.shape
    assert torch.equal(ids, before)


# ---------------------------------------------------------------- the reference fixture


def test_labels_from_fixture_lang_x_equal_fixture_labels(reference_dir):
    batch = torch.load(reference_dir / "batch.pt", weights_only=True)
    ids = batch["token_ids"]
    special = SpecialTokens(media=ids["media"], endofchunk=ids["endofchunk"], pad=ids["pad"], eos=ids["eos"])
    assert special == SPECIAL
    for name, fn in (("laion", laion_labels), ("mmc4", mmc4_labels)):
        sub = batch[name]
        assert torch.equal(fn(sub["lang_x"], special), sub["labels"]), name
        assert torch.equal(fn(sub["lang_x"], special, sub["attention_mask"]), sub["labels"]), name
