"""Built-in synthetic data: deterministic, readable in both layouts, described with single-token words."""

import base64
import io
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import pytest
import webdataset as wds
from PIL import Image
from scipy.optimize import linear_sum_assignment
from streaming import LocalDataset

from flamingo_composer import vocab
from flamingo_composer.cli import make_synthetic_data
from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.data.items import SkipSample, sample_rng
from flamingo_composer.data.laion import LaionPreprocessConfig, preprocess_laion
from flamingo_composer.data.mds import mmc4_doc_from_mds
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, preprocess_mmc4
from flamingo_composer.shards import synthetic
from flamingo_composer.shards.synthetic import SyntheticConfig, write_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(
    num_laion=24, num_laion_val=8, num_mmc4=12, num_mmc4_val=4, laion_shard_size=10, mmc4_shard_size=5
)


def tiny_tokenizer():
    tokenizer = vocab.build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic_dataset(out, SyntheticConfig(seed=1, **SMALL))
    return out


def read_wds(paths):
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_manifest(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["counts"]["laion"] == {"train": 24, "val": 8}
    assert manifest["wds"]["laion"]["train"] == [f"wds/laion/train-{i:06d}.tar" for i in range(3)]
    assert manifest["wds"]["laion"]["train_pattern"] == "wds/laion/train-{000000..000002}.tar"
    assert manifest["wds"]["laion"]["val"] == ["wds/laion/val-000000.tar"]
    assert manifest["wds"]["mmc4"]["train"] == [f"wds/mmc4/train-{i:06d}.tar" for i in range(3)]
    assert manifest["wds"]["mmc4"]["val"] == ["wds/mmc4/val-000000.tar"]
    for dataset in ("laion", "mmc4"):
        for split in ("train", "val"):
            assert manifest["mds"][dataset][split] == f"mds/{dataset}/{split}"
            assert (data_dir / manifest["mds"][dataset][split] / "index.json").is_file()
            assert all((data_dir / path).is_file() for path in manifest["wds"][dataset][split])
    assert manifest["recommended"]["mmc4.min_image_bytes"] == synthetic.SYNTHETIC_MIN_IMAGE_BYTES
    assert not [p for p in data_dir.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_deterministic_for_a_seed(data_dir, tmp_path):
    write_synthetic_dataset(tmp_path / "again", SyntheticConfig(seed=1, **SMALL))
    assert files(tmp_path / "again") == files(data_dir)
    write_synthetic_dataset(tmp_path / "other", SyntheticConfig(seed=2, **SMALL), formats=("wds",))
    assert (tmp_path / "other/wds/laion/train-000000.tar").read_bytes() != (
        data_dir / "wds/laion/train-000000.tar"
    ).read_bytes()
    assert not (tmp_path / "other/mds").exists()


def test_refuses_non_empty_output(data_dir):
    with pytest.raises(FileExistsError, match=str(data_dir)):
        write_synthetic_dataset(data_dir, SyntheticConfig(**SMALL))


def test_wds_and_mds_hold_the_same_samples(data_dir):
    laion = read_wds(sorted((data_dir / "wds/laion").glob("train-*.tar")))
    assert len(laion) == 24 and {"jpg", "txt", "json"} <= set(laion[0])
    mds_laion = LocalDataset(str(data_dir / "mds/laion/train"))
    assert [s["key"] for s in mds_laion] == [s["__key__"] for s in laion]
    for w, m in zip(laion, mds_laion):
        assert m["jpg"] == w["jpg"] and m["txt"] == w["txt"].decode()

    docs = read_wds(sorted((data_dir / "wds/mmc4").glob("train-*.tar")))
    mds_docs = LocalDataset(str(data_dir / "mds/mmc4/train"))
    assert len(docs) == len(mds_docs) == 12
    for w, m in zip(docs, mds_docs):
        doc = json.loads(w["json"])
        restored, images = mmc4_doc_from_mds(m)
        assert images == [base64.b64decode(info["image_base64"]) for info in doc["image_info"]]
        assert restored["text_list"] == doc["text_list"]
        assert restored["similarity_matrix"] == doc["similarity_matrix"]


def test_documents_hold_1_to_6_images_and_a_matching_similarity_matrix(data_dir):
    docs = [json.loads(s["json"]) for s in read_wds(sorted((data_dir / "wds/mmc4").glob("*.tar")))]
    counts = [len(doc["image_info"]) for doc in docs]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 1
    for doc in docs:
        sim = np.array(doc["similarity_matrix"])
        assert sim.shape == (len(doc["image_info"]), len(doc["text_list"]))
        assert 0.1 <= sim.min() and sim.max() <= 0.36
        rows, cols = linear_sum_assignment(-sim)
        assert (
            sim[rows, cols] >= 0.24
        ).all()  # every image is matched to its own sentence above the threshold
        for row, col in zip(rows, cols):
            sentence = doc["text_list"][col]
            assert sentence.split()[0] in {"here", "this", "the", "we"} and " at the " in sentence
            assert doc["image_info"][row]["matched_text_index"] == col


def test_every_text_word_is_one_tiny_tokenizer_token(data_dir):
    tokenizer = tiny_tokenizer()
    texts = [s["txt"].decode() for s in read_wds(sorted((data_dir / "wds/laion").glob("*.tar")))]
    for s in read_wds(sorted((data_dir / "wds/mmc4").glob("*.tar"))):
        texts += json.loads(s["json"])["text_list"]
    words = set(vocab.WORDS)
    for text in texts:
        assert set(text.split()) <= words, text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids, text


def test_captions_describe_the_rendered_scene():
    """The named colour sits at the named position; the caption names colour, shape, position and background."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        scene = synthetic.random_scene(rng, max_shapes=1)
        spec = scene.shapes[0]
        caption = synthetic.laion_caption(scene, rng).split()
        for word in (spec.color, spec.shape, spec.position, scene.texture, scene.background):
            assert word in caption
        if spec.shape == "ring":  # hollow: its centre shows the background
            continue
        image = np.asarray(
            Image.open(io.BytesIO(synthetic.render_scene(scene, rng, 64))).convert("RGB"), float
        )
        fx, fy = synthetic.POSITION_XY[spec.position]
        x, y = int(fx * 64), int(fy * 64)
        centre = np.median(image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3), axis=0)
        assert np.abs(centre - synthetic.COLOR_RGB[spec.color]).max() < 45, (spec, centre)


def test_samples_preprocess_and_images_follow_sentence_order(data_dir):
    tokenizer, transform = tiny_tokenizer(), open_clip.image_transform(32, is_train=False)
    for sample in read_wds(sorted((data_dir / "wds/laion").glob("*.tar"))):
        assert len(sample["jpg"]) >= synthetic.SYNTHETIC_MIN_IMAGE_BYTES
        out = preprocess_laion(
            sample["jpg"], sample["txt"], key=sample["__key__"], tokenizer=tokenizer, image_transform=transform,
            cfg=LaionPreprocessConfig(max_tokens=32), rng=sample_rng(0, 0, sample["__key__"]),
        )  # fmt: skip
        assert out["attention_mask"][-1] == 0  # the caption fits in 32 tokens

    cfg = MMC4PreprocessConfig(
        min_image_bytes=synthetic.SYNTHETIC_MIN_IMAGE_BYTES, single_image_drop_prob=0.0
    )
    for sample in read_wds(sorted((data_dir / "wds/mmc4").glob("*.tar"))):
        doc = json.loads(sample["json"])
        out = preprocess_mmc4(
            doc, key=sample["__key__"], tokenizer=tokenizer, image_transform=transform, cfg=cfg,
            rng=sample_rng(0, 0, sample["__key__"]),
        )  # fmt: skip
        assert int(out["image_mask"].sum()) == len(doc["image_info"])  # nothing dropped or truncated at 256
        # k-th slot = the image whose best sentence is the k-th described one (image_info order is shuffled)
        by_sentence = sorted(
            range(len(doc["image_info"])), key=lambda i: doc["image_info"][i]["matched_text_index"]
        )
        for slot, index in enumerate(by_sentence):
            image = Image.open(
                io.BytesIO(base64.b64decode(doc["image_info"][index]["image_base64"]))
            ).convert("RGB")
            pixels = SplitImageTransform.of(transform).normalize(out["images"][slot])  # the device step
            assert np.allclose(pixels.numpy(), transform(image).numpy())


def test_bad_every_breaks_samples_with_known_reasons(tmp_path):
    cfg = SyntheticConfig(seed=0, num_laion=6, num_laion_val=0, num_mmc4=6, num_mmc4_val=0, bad_every=2)
    tokenizer, transform = tiny_tokenizer(), open_clip.image_transform(32, is_train=False)
    reasons = {"laion": [], "mmc4": []}
    for i in range(6):
        sample = synthetic.make_laion_sample(cfg, "train", i)
        try:
            preprocess_laion(
                sample["jpg"], sample["txt"], key=sample["key"], tokenizer=tokenizer, image_transform=transform,
                cfg=LaionPreprocessConfig(), rng=sample_rng(0, 0, i),
            )  # fmt: skip
            reasons["laion"].append(None)
        except SkipSample as skip:
            reasons["laion"].append(skip.reason)
        doc = synthetic.make_mmc4_document(cfg, "train", i)
        try:
            preprocess_mmc4(
                json.dumps(doc["doc"]), key=doc["key"], tokenizer=tokenizer, image_transform=transform,
                cfg=MMC4PreprocessConfig(min_image_bytes=0, single_image_drop_prob=0.0), rng=sample_rng(0, 0, i),
            )  # fmt: skip
            reasons["mmc4"].append(None)
        except SkipSample as skip:
            reasons["mmc4"].append(skip.reason)
    assert reasons["laion"] == [None, "corrupt_image", None, "empty_caption", None, "missing_image"]
    assert reasons["mmc4"] == [None, "bad_base64", None, "bad_similarity_matrix", None, "malformed_json"]


def test_cli_defaults_match_config():
    defaults, config = make_synthetic_data.DEFAULTS, asdict(SyntheticConfig())
    assert defaults == {name: config[name] for name in defaults}
    assert set(config) - set(defaults) == {"mds_size_limit", "jpeg_quality"}


def test_cli_help_and_small_run(tmp_path, capsys):
    script = str(REPO / "tools/make_synthetic_data.py")
    help_text = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--out" in help_text and "--format" in help_text and "--seed" in help_text
    tool = make_synthetic_data
    args = [
        "--num-laion",
        "4",
        "--num-laion-val",
        "2",
        "--num-mmc4",
        "3",
        "--num-mmc4-val",
        "1",
        "--format",
        "mds",
    ]
    assert tool.main(["--out", str(tmp_path / "d"), *args]) == 0
    assert json.loads((tmp_path / "d/manifest.json").read_text())["formats"] == ["mds"]
    assert tool.main(["--out", str(tmp_path / "d"), *args]) == 2
    assert str(tmp_path / "d") in capsys.readouterr().err
