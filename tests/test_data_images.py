"""The image path of the data pipeline: workers send uint8 images of the real slots only, the DataSpec normalises
them on the device (equal to SPEC 2's vision_x once padded), split_batch cuts them with their rows, and MMC4 images
are decoded only once matching and truncation keep them."""

from __future__ import annotations

import base64
import io
import itertools
import json

import matplotlib.cbook
import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from data_loader_helpers import IMAGE_SIDE, MAX_IMAGES, data_config
from data_loader_helpers import image_transform as small_transform
from PIL import Image
from step_utils import device_vision_x
from torch.utils.data import DataLoader

from flamingo_composer.data import mmc4 as mmc4_module
from flamingo_composer.data.dataspec import NormalizeImages, build_dataspec, split_batch
from flamingo_composer.data.dual_loader import build_dual_loader
from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.data.items import received, send_by_value
from flamingo_composer.data.kinds import INTERLEAVED, PAIRS
from flamingo_composer.data.laion import LaionPreprocessConfig, preprocess_laion
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, MMC4Processor, preprocess_mmc4
from flamingo_composer.data.wds import WebDatasetItems
from flamingo_composer.models.embeddings import add_flamingo_tokens
from flamingo_composer.special_tokens import SpecialTokens
from flamingo_composer.vocab import build_tiny_tokenizer

SIZE = 224
PHOTO = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")  # 512x600
CROPS = [(0, 0, 512, 600), (40, 60, 420, 300), (100, 150, 380, 560), (0, 300, 512, 600), (200, 0, 512, 260)]


def photo(index: int) -> bytes:
    """A real photograph (matplotlib's sample image), cropped to a different box and aspect ratio per index and
    JPEG-encoded, so resize, crop and decode all do real work."""
    buffer = io.BytesIO()
    PHOTO.crop(CROPS[index % len(CROPS)]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decoded(image_bytes: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


class Coins:
    """Stands in for the per-sample generator: returns the given random() values in order."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


FLIP, KEEP = 0.1, 0.9  # a flip coin < 0.5 flips; a drop coin >= 0.5 keeps a single-image document


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tiny_tokenizer()
    add_flamingo_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def special(tok):
    return SpecialTokens.from_tokenizer(tok)


@pytest.fixture(scope="module")
def clip_transform():
    return open_clip.image_transform(SIZE, is_train=False)  # resize bicubic, center crop, RGB, ToTensor, Normalize


def mmc4_doc(images: list[bytes]) -> dict:
    """A document whose k-th image belongs to the k-th sentence."""
    sentences = [f"a {color} circle ." for color in ["red", "green", "blue", "pink", "cyan"][: len(images)]]
    sim = [[0.3 if i == j else 0.1 for j in range(len(sentences))] for i in range(len(images))]
    info = [{"image_base64": base64.b64encode(data).decode("ascii")} for data in images]
    return {"text_list": sentences, "image_info": info, "similarity_matrix": sim}


def laion_batch(tok, special, transform):
    """Four LAION pairs of different photo crops, the 2nd and 4th flipped; and what the float pipeline gives."""
    flips = [False, True, False, True]
    samples = [
        preprocess_laion(photo(i), "a red circle", key=str(i), tokenizer=tok, image_transform=transform,
                         cfg=LaionPreprocessConfig(max_tokens=8, random_flip=True), rng=Coins(FLIP if f else KEEP))
        for i, f in enumerate(flips)
    ]  # fmt: skip
    expected = torch.stack([
        (transform(decoded(photo(i))).flip(-1) if f else transform(decoded(photo(i))))[None, None]
        for i, f in enumerate(flips)
    ])  # (B, 1, 1, 3, H, W): the old pipeline, transform(image) in the worker
    return PAIRS.collate(samples, special), expected


def mmc4_batch(tok, special, transform):
    """Three documents with 1, 3 and 2 photos in 4 slots, the 2nd flipped; and what the float pipeline gives."""
    docs = [[photo(0)], [photo(1), photo(2), photo(3)], [photo(4), photo(0)]]
    flips = [False, True, False]
    cfg = MMC4PreprocessConfig(max_num_images=4, min_image_bytes=0, random_flip=True)
    samples = [
        preprocess_mmc4(mmc4_doc(images), key=str(i), tokenizer=tok, image_transform=transform, cfg=cfg,
                        rng=Coins(FLIP if f else KEEP, KEEP))
        for i, (images, f) in enumerate(zip(docs, flips))
    ]  # fmt: skip
    side = transform(PHOTO).shape[-1]
    expected = torch.zeros(len(docs), 4, 1, 3, side, side)  # (B, T_img, 1, 3, H, W), empty slots zero
    for row, (images, f) in enumerate(zip(docs, flips)):
        for slot, data in enumerate(images):
            pixels = transform(decoded(data))  # (3, H, W)
            expected[row, slot, 0] = pixels.flip(-1) if f else pixels
    return INTERLEAVED.collate(samples, special), expected


# ------------------------------------------------------------------------------- equal to the float pipeline


@pytest.mark.parametrize("dataset", ["laion", "mmc4"])
def test_uint8_then_device_normalisation_equals_the_float_pipeline(tok, special, clip_transform, dataset):
    make = laion_batch if dataset == "laion" else mmc4_batch
    sub, expected = make(tok, special, clip_transform)
    assert sub["images"].dtype == torch.uint8 and "vision_x" not in sub
    vision_x = device_vision_x(clip_transform, sub)
    assert vision_x.dtype == torch.float32 and vision_x.shape == expected.shape
    torch.testing.assert_close(vision_x, expected, atol=1e-6, rtol=0)
    assert torch.equal(sub["image_mask"], expected.flatten(2).ne(0).any(-1))  # (B, T_img)


def test_normalisation_is_read_from_the_transform(clip_transform):
    normalize = clip_transform.transforms[-1]
    split = SplitImageTransform.of(clip_transform)
    assert split.mean == tuple(normalize.mean) and split.std == tuple(normalize.std)
    custom = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))])
    image = decoded(photo(1))
    pixels = SplitImageTransform.of(custom)
    torch.testing.assert_close(pixels.normalize(pixels.to_uint8(image)), custom(image), atol=1e-6, rtol=0)
    assert SplitImageTransform.of(pixels) is pixels


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda image: T.functional.to_tensor(image), "cannot split"),
        (T.Compose([T.Resize(32)]), "exactly one ToTensor"),
        (T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3), T.RandomErasing()]), "only one Normalize"),
        (T.Compose([T.ToTensor(), T.ConvertImageDtype(torch.float16)]), "only one Normalize"),
    ],
)
def test_a_transform_that_cannot_be_split_is_rejected(tok, transform, message):
    with pytest.raises(ValueError, match=message):
        SplitImageTransform.of(transform)
    with pytest.raises(ValueError, match=message):  # at build time, before any data is read
        MMC4Processor(tok, transform, MMC4PreprocessConfig(), seed=0)


# ------------------------------------------------------------------------------------ split_batch and images


@pytest.mark.parametrize("microbatch", [1, 2, 3, 4])
def test_split_keeps_every_image_with_its_row(tok, special, microbatch):
    laion, _ = laion_batch(tok, special, small_transform)
    mmc4, _ = mmc4_batch(tok, special, small_transform)
    batch = {"laion": laion, "mmc4": mmc4}
    whole = {name: device_vision_x(small_transform, sub) for name, sub in batch.items()}
    pieces = split_batch(batch, microbatch)
    for name, sub in batch.items():
        own = [piece[name] for piece in pieces if name in piece]  # one dataset per microbatch
        for part in own:  # every piece's images are exactly its rows' images
            assert part["images"].shape[0] == int(part["image_mask"].sum()), name
        assert sum(part["images"].shape[0] for part in own) == sub["images"].shape[0]
        expanded = torch.cat([device_vision_x(small_transform, part) for part in own])
        assert torch.equal(expanded, whole[name]), name  # each row kept its own images, in order
        width = min(part["input_ids"].shape[1] for part in own)  # microbatches drop trailing padding columns
        assert torch.equal(torch.cat([part["input_ids"][:, :width] for part in own]), sub["input_ids"][:, :width])


def test_the_dataspec_normalises_with_the_loaders_transform(root, tok):
    loader = build_dual_loader(data_config(root, "mds"), tok, small_transform, rank=0, world_size=1)
    batch = next(iter(loader))
    loader.close()
    spec = build_dataspec(loader)
    assert isinstance(spec.microbatch_transforms, NormalizeImages)
    assert spec.microbatch_transforms.image_transform is loader.image_transform
    for piece in spec.split_batch(batch, 2):
        model_batch = spec.microbatch_transforms(piece)
        for name, sub in model_batch.items():
            assert sub["images"].dtype == torch.float32 and sub["images"].shape[0] == len(sub["image_slots"]), name
    with pytest.raises(ValueError, match="no image transform"):
        NormalizeImages(None)(batch)


# ------------------------------------------------------------------------------- what workers send, pinned


def test_workers_send_uint8_images_of_the_real_slots_only(root, tok):
    """The items a worker hands the main process, and the collated batch: uint8, no empty slot."""
    cfg = data_config(root, "wds")
    process = MMC4Processor(tok, small_transform, cfg["mmc4"].preprocess, seed=0)
    urls = sorted(str(p) for p in (root / "wds" / "mmc4").glob("train-*.tar"))
    items = WebDatasetItems(urls, process, seed=0, shuffle=False, shuffle_buffer=0, resample=False, rank=0,
                            world_size=1)  # fmt: skip
    loader = DataLoader(items, batch_size=None, num_workers=1, collate_fn=send_by_value)
    sent = [item for item in itertools.islice(loader, 24) if "sample" in item]
    # By value (numpy bytes), not as shared-memory tensors (a file-descriptor handshake per tensor, ~1 ms each).
    assert all(isinstance(v, np.ndarray) for item in sent for v in item["sample"].values())
    samples = [received(item)["sample"] for item in sent]
    assert len(samples) >= 8
    side = IMAGE_SIDE
    for sample in samples:
        images, mask = sample["images"], sample["image_mask"]  # (n, 3, H, W), (T_img,)
        assert images.dtype == torch.uint8 and images.shape == (int(mask.sum()), 3, side, side)
        assert not any(t.is_floating_point() for t in sample.values())  # no float image tensor crosses
    batch = INTERLEAVED.collate(samples, SpecialTokens.from_tokenizer(tok))
    real = int(batch["image_mask"].sum())
    assert real < batch["image_mask"].numel()  # this data has empty slots ...
    assert batch["images"].nbytes == real * 3 * side * side  # ... and none of them is sent: 1 byte per value
    float_slots = batch["image_mask"].numel() * 3 * side * side * 4  # the old (B, T_img, 1, 3, H, W) float32
    assert batch["images"].nbytes * 4 < float_slots


def test_batches_are_pinned_exactly_when_cuda_is_there(root, tok):
    cfg = data_config(root, "mds", laion={"enabled": False})
    loader = build_dual_loader(cfg, tok, small_transform, rank=0, world_size=1)  # default: pin when CUDA is there
    sub = next(iter(loader))["mmc4"]
    loader.close()
    tensors = [value for value in sub.values() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 6 and sub["image_mask"].shape[1] == MAX_IMAGES  # + text_time, images, image_mask
    assert all(t.is_pinned() == torch.cuda.is_available() for t in tensors)


# --------------------------------------------------------------------------------------------- lazy decoding


@pytest.fixture
def decodes(monkeypatch):
    """Every image the MMC4 preprocessing decodes, in order (its bytes)."""
    seen, decode = [], mmc4_module.decode_image

    def counted(image_bytes, **kwargs):
        seen.append(image_bytes)
        return decode(image_bytes, **kwargs)

    monkeypatch.setattr(mmc4_module, "decode_image", counted)
    return seen


def test_mmc4_decodes_only_the_images_it_keeps(tok, decodes):
    """Corrupt images the row does not keep (below the similarity threshold, cut by max_num_images, truncated
    away) neither reject the document nor get decoded."""
    red, green = photo(0), photo(1)
    corrupt = [b"corrupt, below the threshold " * 50, b"corrupt, truncated away " * 50, b"corrupt, cut " * 50]
    sentences = ["a red circle .", "a green bar .", "some more text .", "a blue star .", "a pink ring ."]
    doc = {
        "text_list": sentences,
        "image_info": [{"image_base64": base64.b64encode(b).decode()} for b in [red, corrupt[0], green, *corrupt[1:]]],
        "similarity_matrix": [
            [0.30, 0.10, 0.10, 0.10, 0.10],  # red -> sentence 0
            [0.10, 0.10, 0.10, 0.10, 0.10],  # corrupt: nothing reaches 0.24
            [0.10, 0.30, 0.10, 0.10, 0.10],  # green -> sentence 1
            [0.10, 0.10, 0.10, 0.30, 0.10],  # corrupt -> sentence 3: its <image> is beyond max_tokens
            [0.10, 0.10, 0.10, 0.10, 0.30],  # corrupt -> sentence 4: the 4th pair, cut by max_num_images=3
        ],
    }
    cfg = MMC4PreprocessConfig(max_tokens=16, max_num_images=3, min_image_bytes=0)
    out = preprocess_mmc4(json.dumps(doc), key="d", tokenizer=tok, image_transform=small_transform, cfg=cfg,
                          rng=Coins(KEEP, KEEP))  # fmt: skip
    assert decodes == [red, green]  # the two kept images, once each; no corrupt one
    assert out["image_mask"].tolist() == [True, True, False]
    split = SplitImageTransform.of(small_transform)
    assert torch.equal(out["images"], torch.stack([split.to_uint8(decoded(red)), split.to_uint8(decoded(green))]))


def test_a_kept_image_that_does_not_decode_is_dropped_and_matching_runs_again(tok, decodes):
    broken, good = b"\xff\xd8 not really a jpeg " * 40, photo(2)
    doc = {
        "text_list": ["a red circle .", "a blue bar ."],
        "image_info": [{"image_base64": base64.b64encode(b).decode()} for b in (broken, good)],
        "similarity_matrix": [[0.35, 0.1], [0.34, 0.30]],  # broken takes sentence 0; without it, good does
    }
    cfg = MMC4PreprocessConfig(max_tokens=24, max_num_images=2, min_image_bytes=0)
    run = lambda d: preprocess_mmc4(d, key="d", tokenizer=tok, image_transform=small_transform, cfg=cfg,  # noqa: E731
                                    rng=Coins(KEEP, KEEP))
    out = run(doc)
    assert decodes == [broken, good]  # both kept at first; the broken one failed and was dropped
    without = {**doc, "image_info": doc["image_info"][1:], "similarity_matrix": doc["similarity_matrix"][1:]}
    expected = run(without)  # as if the broken image had never been there (the eager pipeline's result)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)
    assert tok.convert_ids_to_tokens(out["input_ids"][:2].tolist()) == ["<image>", "a"]  # good moved to sentence 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_expansion_on_the_gpu_equals_the_cpu_one(tok, special, clip_transform):
    """As the trainer runs it: a pinned batch, copied without blocking, expanded on the GPU."""
    sub, expected = mmc4_batch(tok, special, clip_transform)
    pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in sub.items()}
    on_gpu = {k: v.to("cuda", non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in pinned.items()}
    vision_x = device_vision_x(clip_transform, on_gpu)
    assert vision_x.device.type == "cuda"
    torch.testing.assert_close(vision_x.cpu(), expected, atol=1e-6, rtol=0)
