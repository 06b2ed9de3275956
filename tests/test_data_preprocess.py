"""LAION / MMC4 per-sample preprocessing, collation and the MDS document layout (SPEC 2)."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from step_utils import device_vision_x
from transformers import AutoTokenizer

from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.data.items import SkipCounter, SkipSample, sample_rng
from flamingo_composer.data.kinds import INTERLEAVED, PAIRS
from flamingo_composer.data.laion import LaionPreprocessConfig, preprocess_laion
from flamingo_composer.data.masking import count_supervised_tokens
from flamingo_composer.data.mds import (
    LAION_MDS_COLUMNS,
    MMC4_MDS_COLUMNS,
    mmc4_doc_from_mds,
    mmc4_doc_to_mds,
)
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, preprocess_mmc4
from flamingo_composer.data.text import clean_text
from flamingo_composer.special_tokens import SpecialTokens
from flamingo_composer.vocab import build_tiny_tokenizer

IMAGE_SIZE = 32
REFERENCE_FIXTURE = Path(__file__).parent / "fixtures" / "openflamingo-tiny-gptneox"


def add_flamingo_tokens(tokenizer):
    """As the model factory does: the two new special tokens, and <PAD> when there is no pad token."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return add_flamingo_tokens(build_tiny_tokenizer())


@pytest.fixture(scope="module")
def special(tok):
    return SpecialTokens.from_tokenizer(tok)


@pytest.fixture(scope="module")
def transform():
    return open_clip.image_transform(IMAGE_SIZE, is_train=False)


def jpeg(color=(200, 30, 30), size=IMAGE_SIZE, noise=0.0, seed=0) -> bytes:
    """A solid (optionally noisy, hence larger) JPEG."""
    pixels = np.full((size, size, 3), color, dtype=np.float32)
    if noise:
        pixels += np.random.default_rng(seed).normal(0, noise, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixels_of(image_bytes: bytes, transform) -> torch.Tensor:
    """The float pipeline: the whole transform on the decoded image."""
    return transform(Image.open(io.BytesIO(image_bytes)).convert("RGB"))  # (3, H, W)


def model_pixels(out: dict, transform) -> torch.Tensor:
    """A sample's uint8 images as the model gets them (the DataSpec's device step): (n, 3, H, W) float."""
    return SplitImageTransform.of(transform).normalize(out["images"])


def model_vision_x(batch: dict, transform) -> torch.Tensor:
    """A collated sub-batch's zero-padded vision_x (B, T_img, 1, 3, H, W), normalised as the DataSpec does it."""
    return device_vision_x(transform, batch)


class ScriptedRng:
    """Stands in for a numpy Generator: returns the given random() values in order."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


NO_FLIP_KEEP = (0.9, 0.9)  # flip coin >= 0.5 (no flip), drop coin >= drop probability (keep)
RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)


def laion(image_bytes, caption, tok, transform, rng=None, **cfg):
    return preprocess_laion(
        image_bytes, caption, key="k", tokenizer=tok, image_transform=transform,
        cfg=LaionPreprocessConfig(**cfg), rng=rng or ScriptedRng(*NO_FLIP_KEEP),
    )  # fmt: skip


def mmc4(doc, tok, transform, rng=None, image_bytes=None, dropped_images=None, **cfg):
    cfg.setdefault("min_image_bytes", 0)
    return preprocess_mmc4(
        doc, key="d", tokenizer=tok, image_transform=transform, cfg=MMC4PreprocessConfig(**cfg),
        rng=rng or ScriptedRng(*NO_FLIP_KEEP), image_bytes=image_bytes, dropped_images=dropped_images,
    )  # fmt: skip


def make_doc(sentences, colors, sim):
    return {
        "text_list": sentences,
        "image_info": [
            {"image_name": f"{i}.jpg", "image_base64": b64(jpeg(c))} for i, c in enumerate(colors)
        ],
        "similarity_matrix": sim,
    }


def tokens(tok, ids):
    return [t for t in tok.convert_ids_to_tokens(ids.tolist()) if t != "<PAD>"]


# ---------------------------------------------------------------- text, special tokens, rng, counter


def test_special_tokens_looked_up_and_missing_token_named(tok):
    special = SpecialTokens.from_tokenizer(tok)
    assert special == SpecialTokens(
        media=tok.convert_tokens_to_ids("<image>"), endofchunk=tok.convert_tokens_to_ids("<|endofchunk|>"),
        pad=tok.pad_token_id, eos=tok.eos_token_id,
    )  # fmt: skip
    with pytest.raises(ValueError, match="<image>"):
        SpecialTokens.from_tokenizer(build_tiny_tokenizer())
    no_pad = build_tiny_tokenizer()
    no_pad.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    with pytest.raises(ValueError, match="pad"):
        SpecialTokens.from_tokenizer(no_pad)


def test_clean_text_removes_literal_special_tokens(tok):
    assert clean_text("a <image>red<|endofchunk|> circle<PAD>", tok) == "a red circle"


def test_sample_rng_depends_on_seed_epoch_and_key_only():
    draw = lambda *args: sample_rng(*args).random(4).tolist()  # noqa: E731
    assert draw(0, 0, "a") == draw(0, 0, "a")
    assert len({tuple(draw(*args)) for args in [(0, 0, "a"), (1, 0, "a"), (0, 1, "a"), (0, 0, "b")]}) == 4


def test_skip_counter_take_returns_and_resets():
    counter = SkipCounter()
    counter.add("corrupt_image")
    counter.add("corrupt_image", 2)
    counter.add("bad_utf8")
    assert dict(counter) == {"corrupt_image": 3, "bad_utf8": 1} and counter["bad_utf8"] == 1
    assert counter.take() == {"corrupt_image": 3, "bad_utf8": 1}
    assert counter.take() == {} and len(counter) == 0


# ---------------------------------------------------------------- the reference fixture's raw samples


@pytest.fixture(scope="module")
def reference():
    tokenizer = add_flamingo_tokens(AutoTokenizer.from_pretrained(REFERENCE_FIXTURE / "lm"))
    batch = torch.load(REFERENCE_FIXTURE / "batch.pt", weights_only=True)
    return tokenizer, batch, open_clip.image_transform(64, is_train=False)


def test_laion_from_fixture_raw_equals_reference_batch(reference):
    tokenizer, batch, transform = reference
    raw, special = batch["raw"], SpecialTokens.from_tokenizer(tokenizer)
    assert special == SpecialTokens(
        **{k: batch["token_ids"][k] for k in ("media", "endofchunk", "pad", "eos")}
    )
    coin = 0.0 if raw["laion_flipped"] else 0.9
    samples = [
        laion(base64.b64decode(image), caption, tokenizer, transform, rng=ScriptedRng(coin), random_flip=True)
        for image, caption in zip(raw["laion_images_png_base64"], raw["laion_captions"])
    ]
    out = PAIRS.collate(samples, special)
    ref = batch["laion"]
    assert torch.equal(out["input_ids"], ref["lang_x"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert torch.equal(out["labels"], ref["labels"])
    torch.testing.assert_close(model_vision_x(out, transform), ref["vision_x"], atol=1e-6, rtol=0)


def test_mmc4_from_fixture_raw_equals_reference_batch(reference):
    """Both fixture documents assign images identically under argmax (2.0.1) and Hungarian (SPEC)."""
    tokenizer, batch, transform = reference
    raw, special = batch["raw"], SpecialTokens.from_tokenizer(tokenizer)
    settings = raw["preprocess"]
    samples = [
        preprocess_mmc4(
            doc, key=str(i), tokenizer=tokenizer, image_transform=transform,
            cfg=MMC4PreprocessConfig(
                max_tokens=settings["max_tokens_mmc4"], max_num_images=settings["max_num_images"],
                sim_threshold=settings["sim_threshold"], min_num_images=settings["min_num_images"], random_flip=True,
            ),
            rng=ScriptedRng(0.0 if flipped else 0.9, 0.9),
        )
        for i, (doc, flipped) in enumerate(zip(raw["mmc4_json"], raw["mmc4_flipped_per_doc"]))
    ]  # fmt: skip
    out = INTERLEAVED.collate(samples, special)
    ref = batch["mmc4"]
    assert torch.equal(out["input_ids"], ref["lang_x"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert torch.equal(out["labels"], ref["labels"])
    torch.testing.assert_close(model_vision_x(out, transform), ref["vision_x"], atol=1e-6, rtol=0)
    # Document 1 lost a 1,208-byte image, an empty base64 and a 0.12 similarity: two images survive.
    assert out["image_mask"].tolist() == [[True, True, True], [True, True, False]]


# ---------------------------------------------------------------- LAION


def test_laion_sample_shapes_dtypes_and_text(tok, special, transform):
    image = jpeg(RED)
    out = laion(image, "  a red circle at the left  ", tok, transform, max_tokens=12)
    assert out["images"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and out["images"].dtype == torch.uint8
    assert out["input_ids"].shape == (12,) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].tolist() == [1] * 9 + [0] * 3
    assert tokens(tok, out["input_ids"]) == (
        ["<image>", "a", "red", "circle", "at", "the", "left", "<|endofchunk|>", "<|endoftext|>"]
    )
    torch.testing.assert_close(model_pixels(out, transform)[0], pixels_of(image, transform))


def test_laion_truncates_to_max_tokens(tok, transform):
    out = laion(jpeg(), "a red circle at the left on a plain blue background", tok, transform, max_tokens=5)
    assert tokens(tok, out["input_ids"]) == ["<image>", "a", "red", "circle", "at"]
    assert out["attention_mask"].tolist() == [1] * 5


def test_laion_flip_is_one_seeded_coin(tok, transform):
    image = jpeg(RED, noise=40)
    plain = laion(image, "a red circle", tok, transform, rng=ScriptedRng(0.9), random_flip=True)["images"]
    flipped = laion(image, "a red circle", tok, transform, rng=ScriptedRng(0.1), random_flip=True)["images"]
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]))
    assert not torch.equal(plain, flipped)
    never = laion(image, "a red circle", tok, transform, rng=ScriptedRng(0.1), random_flip=False)["images"]
    assert torch.equal(never, plain)
    runs = [
        laion(image, "a red circle", tok, transform, rng=sample_rng(7, 0, "key-3"), random_flip=True)[
            "images"
        ]
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_laion_literal_special_tokens_are_removed(tok, special, transform):
    out = laion(jpeg(), "a <image>red<|endofchunk|> circle <PAD>", tok, transform, max_tokens=10)
    ids = out["input_ids"]
    assert int((ids == special.media).sum()) == 1 and int((ids == special.endofchunk).sum()) == 1
    assert tokens(tok, ids) == ["<image>", "a", "red", "circle", "<|endofchunk|>", "<|endoftext|>"]


@pytest.mark.parametrize(
    ("image", "caption", "reason"),
    [
        (jpeg()[:200], "a red circle", "corrupt_image"),
        (b"not an image at all", "a red circle", "corrupt_image"),
        (b"", "a red circle", "missing_image"),
        (None, "a red circle", "missing_image"),
        (jpeg(), "", "empty_caption"),
        (jpeg(), "   \n ", "empty_caption"),
        (jpeg(), " <image><|endofchunk|> ", "empty_caption"),
        (jpeg(), b"a red \xff\xfe circle", "bad_utf8"),
        (jpeg(), "a red \udcff circle", "bad_utf8"),
    ],
)
def test_laion_bad_input_is_skipped_with_reason(tok, transform, image, caption, reason):
    with pytest.raises(SkipSample) as info:
        laion(image, caption, tok, transform)
    assert info.value.reason == reason


def test_laion_utf8_bytes_caption_accepted(tok, transform):
    out = laion(jpeg(), b"a red circle", tok, transform, max_tokens=8)
    assert tokens(tok, out["input_ids"])[1:4] == ["a", "red", "circle"]


# ---------------------------------------------------------------- MMC4: steps of SPEC 2


def test_mmc4_non_monotonic_assignment_orders_images_by_sentence(tok, special, transform):
    """Both images prefer sentence 0 (argmax would collide); Hungarian gives image 0 sentence 2 instead.

    image_info order (red, green) is not the sentence order (green at 0, red at 2): the first <image>
    must carry green, the second red.
    """
    sentences = ["a green square .", "some text .", "a red circle ."]
    sim = [[0.34, 0.1, 0.30], [0.35, 0.1, 0.2]]  # (images, sentences)
    doc = make_doc(sentences, [RED, GREEN], sim)
    out = mmc4(doc, tok, transform, max_tokens=24, max_num_images=3)
    assert tok.decode(out["input_ids"][out["attention_mask"].bool()]) == (
        "<image> a green square. some text. <|endofchunk|> <image> a red circle. <|endofchunk|> <|endoftext|>"
    )
    assert out["image_mask"].tolist() == [True, True, False]
    torch.testing.assert_close(model_pixels(out, transform)[0], pixels_of(jpeg(GREEN), transform))
    torch.testing.assert_close(model_pixels(out, transform)[1], pixels_of(jpeg(RED), transform))
    assert out["images"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and out["images"].dtype == torch.uint8
    assert out["image_mask"].dtype == torch.bool


def test_mmc4_text_formatting(tok, transform):
    """<|endofchunk|><image> before each image's sentence, first <|endofchunk|> dropped, spaces removed."""
    sentences = ["this is a story .", "a red circle .", "more text .", "a blue square ."]
    doc = make_doc(sentences, [BLUE, RED], [[0.1, 0.1, 0.1, 0.3], [0.1, 0.3, 0.1, 0.1]])
    out = mmc4(doc, tok, transform, max_tokens=32)
    assert (
        tokens(tok, out["input_ids"])
        == (
            "this is a story . <image> a red circle . more text . <|endofchunk|> <image> a blue square . "
            "<|endofchunk|> <|endoftext|>"
        ).split()
    )


def test_mmc4_threshold_drops_low_similarity_pairs(tok, transform):
    sentences = ["a red circle .", "a blue square ."]
    doc = make_doc(sentences, [RED, BLUE], [[0.24, 0.1], [0.1, 0.2399]])
    out = mmc4(doc, tok, transform, max_tokens=16)
    assert out["image_mask"].tolist() == [True] + [False] * 5
    assert tokens(tok, out["input_ids"]).count("<image>") == 1
    with pytest.raises(SkipSample) as info:
        mmc4(doc, tok, transform, sim_threshold=0.3)
    assert info.value.reason == "low_similarity"


def test_mmc4_max_num_images_cut_in_sentence_order(tok, transform):
    """Three images, two slots: the images of the two earliest sentences are kept, whatever image_info order."""
    sentences = ["a red circle .", "a green bar .", "a blue star ."]
    colors = [BLUE, GREEN, RED]  # image i describes sentence 2 - i; highest similarity on the last sentence
    sim = [[0.1, 0.1, 0.40], [0.1, 0.35, 0.1], [0.30, 0.1, 0.1]]
    out = mmc4(make_doc(sentences, colors, sim), tok, transform, max_tokens=32, max_num_images=2)
    assert (
        tokens(tok, out["input_ids"])
        == (
            "<image> a red circle . <|endofchunk|> <image> a green bar . a blue star . <|endofchunk|> <|endoftext|>"
        ).split()
    )
    torch.testing.assert_close(model_pixels(out, transform)[0], pixels_of(jpeg(RED), transform))
    torch.testing.assert_close(model_pixels(out, transform)[1], pixels_of(jpeg(GREEN), transform))


def test_mmc4_truncation_removes_an_image(tok, special, transform):
    sentences = ["a red circle at the left .", "a blue square at the right ."]
    doc = make_doc(sentences, [RED, BLUE], [[0.3, 0.1], [0.1, 0.3]])
    out = mmc4(doc, tok, transform, max_tokens=9, max_num_images=3)
    assert tokens(tok, out["input_ids"]) == "<image> a red circle at the left . <|endofchunk|>".split()
    assert out["image_mask"].tolist() == [True, False, False]
    assert out["images"].shape[0] == 1
    # The same document with room for both images keeps both.
    assert mmc4(doc, tok, transform, max_tokens=24, max_num_images=3)["image_mask"].tolist() == [
        True,
        True,
        False,
    ]


def test_mmc4_single_image_drop_and_last_token_rule(tok, transform):
    doc = make_doc(["a red circle .", "more text ."], [RED], [[0.3, 0.1]])
    keep = mmc4(doc, tok, transform, rng=ScriptedRng(0.9, 0.5))  # drop coin 0.5 is not < 0.5
    assert keep["image_mask"][0]
    with pytest.raises(SkipSample) as info:
        mmc4(doc, tok, transform, rng=ScriptedRng(0.9, 0.49))
    assert info.value.reason == "single_image_dropped"
    with pytest.raises(SkipSample) as info:
        mmc4(doc, tok, transform, rng=ScriptedRng(0.9, 0.99), single_image_drop_prob=1.0)
    assert info.value.reason == "single_image_dropped"
    mmc4(doc, tok, transform, rng=ScriptedRng(0.9, 0.0), single_image_drop_prob=0.0)  # never dropped
    # The only <image> is the last token after truncation: always rejected, whatever the coin.
    late = make_doc(["some text here .", "a red circle ."], [RED], [[0.1, 0.3]])
    with pytest.raises(SkipSample) as info:
        mmc4(late, tok, transform, rng=ScriptedRng(0.9, 0.99), max_tokens=5)
    assert info.value.reason == "no_supervised_tokens"


def test_mmc4_single_image_drop_is_seeded_per_document(tok, transform):
    doc = make_doc(["a red circle .", "more text ."], [RED], [[0.3, 0.1]])

    def kept(seed, epoch, key):
        try:
            mmc4(doc, tok, transform, rng=sample_rng(seed, epoch, key))
            return True
        except SkipSample as skip:
            assert skip.reason == "single_image_dropped"
            return False

    first = [kept(3, 0, f"doc-{i}") for i in range(40)]
    assert first == [kept(3, 0, f"doc-{i}") for i in range(40)]  # a resumed run repeats the choices
    assert 8 <= sum(first) <= 32  # about half kept
    assert first != [kept(3, 1, f"doc-{i}") for i in range(40)]  # a new epoch draws again


def test_mmc4_min_num_images(tok, transform):
    doc = make_doc(["a red circle .", "a blue bar ."], [RED, BLUE], [[0.3, 0.1], [0.1, 0.3]])
    with pytest.raises(SkipSample) as info:
        mmc4(doc, tok, transform, min_num_images=2, max_tokens=6)
    assert info.value.reason == "too_few_images"
    assert mmc4(doc, tok, transform, min_num_images=2, max_tokens=16)["image_mask"].sum() == 2


def test_mmc4_flip_applies_to_all_images_of_a_document(tok, transform):
    colors = [RED, BLUE]
    doc = make_doc(["a red circle .", "a blue bar ."], colors, [[0.3, 0.1], [0.1, 0.3]])
    for info, color in zip(doc["image_info"], colors):
        info["image_base64"] = b64(jpeg(color, noise=40))
    plain = mmc4(doc, tok, transform, rng=ScriptedRng(0.9, 0.9), random_flip=True)["images"]
    flipped = mmc4(doc, tok, transform, rng=ScriptedRng(0.1, 0.9), random_flip=True)["images"]
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]))
    assert not torch.equal(plain[:2], flipped[:2])


def test_mmc4_literal_special_tokens_in_sentences_are_removed(tok, special, transform):
    doc = make_doc(["a <image>red circle<|endofchunk|> .", "<image> text ."], [RED], [[0.3, 0.1]])
    out = mmc4(doc, tok, transform, max_tokens=16)
    assert int((out["input_ids"] == special.media).sum()) == 1
    assert (
        tokens(tok, out["input_ids"]) == "<image> a red circle . text . <|endofchunk|> <|endoftext|>".split()
    )


def test_mmc4_default_min_image_bytes_filters_small_images(tok, transform):
    big, small = jpeg(RED, size=128, noise=60), jpeg(BLUE)
    assert len(big) >= 11000 > len(small)
    doc = {
        "text_list": ["a red circle .", "a blue bar ."],
        "image_info": [{"image_base64": b64(small)}, {"image_base64": b64(big)}],
        "similarity_matrix": [[0.1, 0.35], [0.3, 0.1]],
    }
    out = preprocess_mmc4(
        doc,
        key="d",
        tokenizer=tok,
        image_transform=transform,
        cfg=MMC4PreprocessConfig(),
        rng=ScriptedRng(0.9, 0.9),
    )
    assert out["image_mask"].sum() == 1  # the small image is not used even though it matches better
    torch.testing.assert_close(model_pixels(out, transform)[0], pixels_of(big, transform))


def _good_doc():
    return make_doc(["a red circle .", "a blue bar ."], [RED, BLUE], [[0.3, 0.1], [0.1, 0.3]])


def _with(mutate):
    doc = _good_doc()
    mutate(doc)
    return doc


def _set_all_images(doc, value):
    for info in doc["image_info"]:
        info["image_base64"] = value


@pytest.mark.parametrize(
    ("doc", "reason", "named"),
    [
        (b"{not json", "malformed_json", None),
        (b"\xff\xfe{}", "bad_utf8", None),
        (
            '{"text_list": ["a red \\udcff circle ."], "image_info": [{}], "similarity_matrix": [[0.3]]}',
            "bad_utf8",
            "text_list[0]",
        ),
        ("[1, 2]", "malformed_json", None),
        (_with(lambda d: d.pop("text_list")), "malformed_json", "text_list"),
        (_with(lambda d: d.update(text_list="a red circle .")), "malformed_json", "text_list"),
        (_with(lambda d: d.update(text_list=["a red circle .", 3])), "malformed_json", "text_list"),
        (_with(lambda d: d.pop("similarity_matrix")), "malformed_json", "similarity_matrix"),
        (_with(lambda d: d.update(image_info=["x.jpg", "y.jpg"])), "malformed_json", "image_info"),
        (_with(lambda d: d.update(image_info=[])), "no_usable_image", "image_info"),
        (_with(lambda d: d.update(similarity_matrix=[[0.3, 0.1]])), "bad_similarity_matrix", "(1, 2)"),
        (_with(lambda d: d.update(similarity_matrix=[[0.3], [0.1]])), "bad_similarity_matrix", None),
        (_with(lambda d: d.update(similarity_matrix=[[0.3, 0.1], [0.1]])), "bad_similarity_matrix", None),
        (
            _with(lambda d: d.update(similarity_matrix=[[0.3, "x"], [0.1, 0.3]])),
            "bad_similarity_matrix",
            None,
        ),
        (
            _with(lambda d: d.update(similarity_matrix=[[0.3, float("nan")], [0.1, 0.3]])),
            "bad_similarity_matrix",
            None,
        ),
        (_with(lambda d: _set_all_images(d, "@@not base64@@")), "bad_base64", None),
        (_with(lambda d: _set_all_images(d, b64(jpeg())[:-3])), "bad_base64", None),
        (_with(lambda d: _set_all_images(d, None)), "missing_image", None),
        (_with(lambda d: [info.pop("image_base64") for info in d["image_info"]]), "missing_image", None),
        (_with(lambda d: _set_all_images(d, "")), "missing_image", None),
        (_with(lambda d: _set_all_images(d, b64(b"garbage bytes, not a jpeg"))), "corrupt_image", None),
        (_with(lambda d: _set_all_images(d, b64(jpeg()[:300]))), "corrupt_image", None),
        (
            _with(
                lambda d: d["image_info"][0].update(image_base64="!!")
                or d["image_info"][1].pop("image_base64")
            ),
            "no_usable_image",
            "bad_base64",
        ),
    ],
)
def test_mmc4_bad_input_is_skipped_with_reason(tok, transform, doc, reason, named):
    with pytest.raises(SkipSample) as info:
        mmc4(doc, tok, transform)
    assert info.value.reason == reason
    if named:
        assert named in str(info.value)


def test_mmc4_one_bad_image_drops_only_that_image(tok, transform):
    doc = _good_doc()
    doc["image_info"][0]["image_base64"] = "!!not base64!!"
    dropped = []
    out = mmc4(doc, tok, transform, max_tokens=16, dropped_images=dropped)
    assert out["image_mask"].sum() == 1
    torch.testing.assert_close(model_pixels(out, transform)[0], pixels_of(jpeg(BLUE), transform))
    assert [skip.reason for skip in dropped] == ["bad_base64"]  # the kept document reports what it lost


def test_mmc4_image_too_small_when_all_images_small(tok, transform):
    with pytest.raises(SkipSample) as info:
        mmc4(_good_doc(), tok, transform, min_image_bytes=100_000)
    assert info.value.reason == "image_too_small"


def test_configs_reject_impossible_values():
    with pytest.raises(ValueError, match="min_num_images"):
        MMC4PreprocessConfig(min_num_images=3, max_num_images=2)
    with pytest.raises(ValueError, match="single_image_drop_prob"):
        MMC4PreprocessConfig(single_image_drop_prob=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        LaionPreprocessConfig(max_tokens=0)


# ---------------------------------------------------------------- collation


def test_collate_schema_labels_and_supervised_count(tok, special, transform):
    laion_samples = [
        laion(jpeg(c), f"a {name} circle", tok, transform, max_tokens=8)
        for c, name in [(RED, "red"), (BLUE, "blue")]
    ]
    batch = PAIRS.collate(laion_samples, special, skipped={"corrupt_image": 2})
    assert batch["images"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["images"].dtype == torch.uint8
    assert batch["image_mask"].shape == (2, 1) and batch["image_mask"].all()
    assert model_vision_x(batch, transform).shape == (2, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 8)
    # per row: a, <color>, circle, <|endofchunk|>, eos supervised -> 5 targets each
    assert int(count_supervised_tokens(batch["labels"])) == 10 and "num_supervised_tokens" not in batch
    assert batch["skipped"] == {"corrupt_image": 2}

    docs = [
        mmc4(_good_doc(), tok, transform, max_tokens=20),
        mmc4(
            make_doc(["intro text .", "a red circle ."], [RED], [[0.1, 0.3]]), tok, transform, max_tokens=20
        ),
    ]
    batch = INTERLEAVED.collate(docs, special)
    assert batch["images"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)  # the real images only: 2 + 1
    assert batch["image_mask"].tolist() == [[True, True] + [False] * 4, [True] + [False] * 5]
    assert model_vision_x(batch, transform).shape == (2, 6, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = batch["labels"]
    expected = [
        "a red circle . <|endofchunk|> a blue bar . <|endofchunk|>".split(),
        "a red circle . <|endofchunk|>".split(),
    ]
    for row_labels, words in zip(labels, expected):
        assert tok.convert_ids_to_tokens(row_labels[row_labels != -100].tolist()) == words
    assert int(count_supervised_tokens(batch["labels"])) == 15 and batch["skipped"] == {}


def test_collate_rejects_mismatched_samples(tok, special, transform):
    a = laion(jpeg(), "a red circle", tok, transform, max_tokens=8)
    b = laion(jpeg(), "a red circle", tok, transform, max_tokens=9)
    with pytest.raises(ValueError, match="input_ids"):
        PAIRS.collate([a, b], special)
    with pytest.raises(ValueError, match="no samples"):
        INTERLEAVED.collate([], special)


# ---------------------------------------------------------------- MDS layout


def test_mds_columns():
    assert LAION_MDS_COLUMNS == {"key": "str", "jpg": "bytes", "txt": "str"}
    assert MMC4_MDS_COLUMNS == {"key": "str", "doc": "json", "image_bytes": "bytes"}


def test_mmc4_mds_round_trip_keeps_original_bytes(tok, transform):
    doc = _good_doc()
    doc["image_info"].append({"image_name": "missing.jpg"})
    doc["image_info"].append({"image_name": "broken.jpg", "image_base64": "###"})
    doc["similarity_matrix"] += [[0.1, 0.1], [0.1, 0.1]]
    originals = [base64.b64decode(info["image_base64"]) for info in doc["image_info"][:2]]
    sample = mmc4_doc_to_mds(doc, "d")
    assert sample["key"] == "d" and isinstance(sample["image_bytes"], bytes)
    assert all("image_base64" not in info for info in sample["doc"]["image_info"])
    assert sample["doc"]["image_info"][0]["image_name"] == "0.jpg"
    assert "image_base64" in doc["image_info"][0]  # the input document is not modified
    json.dumps(sample["doc"])  # storable in a 'json' column

    restored, images = mmc4_doc_from_mds(sample)
    assert images == originals + [None, None]
    assert (
        restored["text_list"] == doc["text_list"]
        and restored["similarity_matrix"] == doc["similarity_matrix"]
    )
    from_wds = mmc4(doc, tok, transform, max_tokens=20)
    from_mds = mmc4(restored, tok, transform, max_tokens=20, image_bytes=images)
    for name in from_wds:
        assert torch.equal(from_wds[name], from_mds[name]), name


def test_mmc4_mds_bad_ranges_are_named():
    sample = mmc4_doc_to_mds(_good_doc(), "d")
    sample["doc"]["image_info"][1]["image_bytes_range"] = [0, len(sample["image_bytes"]) + 1]
    with pytest.raises(SkipSample, match=r"image_info\[1\]") as info:
        mmc4_doc_from_mds(sample)
    assert info.value.reason == "malformed_json"
