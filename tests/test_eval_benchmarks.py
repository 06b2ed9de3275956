"""The benchmarks' data layouts, OK-VQA's post-processing, ROC-AUC and RICES, against the reference's eval code
(open_flamingo 2.0.1) and scikit-learn; bad input named and counted; configuration problems stop at config time.
All data is hand-made here (tests/eval_benchmark_data.py); no model but a tiny open_clip tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_benchmark_data import (
    flickr,
    hateful_memes,
    image_folder,
    ok_vqa,
    textvqa,
    tiny_nltk_fixture,  # noqa: F401 (the tiny_nltk fixture)
    vizwiz,
    write_image,
)

from flamingo_composer.eval.class_datasets import load_hateful_memes, load_image_folder, read_class_names
from flamingo_composer.eval.class_metrics import roc_auc
from flamingo_composer.eval.config import EvalSplitConfig, EvaluatorConfig
from flamingo_composer.eval.tasks import load_split

# ------------------------------------------------------------------------------------------------------ OK-VQA

ANSWERS = [
    "surfing", "two dogs running", "bananas", "frisbee, ball", "skiing Question: what is it", "leaves", "Americans",
    "riding horses", "swimming", "clothes", "texting friends", "eating Short answer: pizza", "police", "red apples",
    "the dogs are running", "tennis", "ran", "Answer: yes", "",
]  # fmt: skip


def test_ok_vqa_postprocessing_equals_the_reference(tiny_nltk):
    from open_flamingo.eval.ok_vqa_utils import postprocess_ok_vqa_generation

    from flamingo_composer.eval.ok_vqa import missing_nltk_data
    from flamingo_composer.eval.postprocess import postprocess

    assert missing_nltk_data() == []
    ours = [postprocess("ok_vqa", a) for a in ANSWERS]
    assert ours == [postprocess_ok_vqa_generation(a) for a in ANSWERS]
    # every rule fired: manual table, "ing" lemmatised, plurals singularised, the VQA cut
    assert ours[:4] == ["surf", "two dog running", "banana", "frisbee"] and ours[7] == "ride horses"
    assert ours[4] == "ski" and ours[11] == "eat"


def test_missing_nltk_data_stops_an_ok_vqa_evaluator_at_config_time(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    split = ok_vqa(tmp_path, "train2014", 2, seed=1)
    with pytest.raises(ValueError, match=r"punkt_tab.*averaged_perceptron_tagger_eng.*wordnet.*nltk\.downloader"):
        EvaluatorConfig(name="okvqa", benchmark="ok_vqa", train=EvalSplitConfig(**split), test=EvalSplitConfig(**split))


# ----------------------------------------------------------------------------------------------------- layouts


def test_flickr_karpathy_layout_reads_as_the_reference(tmp_path):
    from open_flamingo.eval.eval_datasets import CaptionDataset

    split = flickr(tmp_path)
    for role, is_train in (("train", True), ("test", False)):
        examples, skips = load_split(EvalSplitConfig(**split), role)
        ref = CaptionDataset(split["images"], split["annotations"], is_train=is_train, dataset_name="flickr")
        assert skips.total == 0 and len(examples) == len(ref)
        for ours, i in zip(examples, range(len(ref))):
            item = ref[i]
            assert (ours.id, ours.caption) == (item["image_id"], item["caption"])
            assert ours.image_path.endswith(ref.annotations[i]["filename"])


def test_vizwiz_and_textvqa_native_layouts_read_as_their_vqav2_conversion(tmp_path):
    viz = vizwiz(tmp_path / "vizwiz", "train", 3, seed=10)
    records = json.loads(open(viz["annotations"]).read())
    records.append({"image": "VizWiz_train_00000099.jpg", "answers": [{"answer": "x"}]})  # no question
    open(viz["annotations"], "w").write(json.dumps(records))
    examples, skips = load_split(EvalSplitConfig(**viz), "train")
    assert [e.id for e in examples] == [0, 1, 2]  # positions in the file, as the reference's converted files
    assert examples[0].image_path.endswith("train/VizWiz_train_00000000.jpg")
    assert examples[0].answers[:2] == ("red", "blue")
    assert skips.counts == {"malformed_record": 1} and "question" in skips.named[0] and "train.json" in skips.named[0]

    tvqa = textvqa(tmp_path / "textvqa", "train", 2, seed=20)
    examples, skips = load_split(EvalSplitConfig(**tvqa), "train")
    assert skips.total == 0 and examples[1].id == 20001 and examples[1].answers[:2] == ("stop", "stop sign")
    assert examples[1].image_path.endswith(f"train_images/{20:04x}{1:012x}.jpg")

    # the reference's VQAv2-layout files: the benchmark gives the image naming
    questions = {"questions": [{"question_id": 0, "image_id": "VizWiz_train_00000000.jpg", "question": "what?"}]}
    annotations = {"annotations": [{"question_id": 0, "answers": [{"answer": "red"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    split = {"format": "vqav2", "questions": str(tmp_path / "q.json"), "annotations": str(tmp_path / "a.json"),
             "images": viz["images"]}  # fmt: skip
    cfg = EvaluatorConfig(
        name="vizwiz", benchmark="vizwiz", train=EvalSplitConfig(**split), test=EvalSplitConfig(**viz)
    )
    assert cfg.kind == "vqa" and cfg.train.image_filename == "{image_id}" and cfg.generation_length == 5
    assert load_split(cfg.train, "train")[0][0].image_path == examples_path(viz, "VizWiz_train_00000000.jpg")
    textvqa_cfg = EvaluatorConfig(
        name="t", benchmark="textvqa", train=EvalSplitConfig(**tvqa), test=EvalSplitConfig(**tvqa)
    )
    assert textvqa_cfg.generation_length == 10


def examples_path(split: dict, name: str) -> str:
    import os

    return os.path.join(split["images"], name)


def test_hateful_memes_jsonl_bad_lines_are_named_and_counted(tmp_path):
    from open_flamingo.eval.eval_datasets import HatefulMemesDataset

    clean = hateful_memes(tmp_path, "clean", [0, 1, 1], seed=5)
    examples, skips = load_hateful_memes(clean["annotations"], clean["images"])
    ref = HatefulMemesDataset(clean["images"], clean["annotations"])
    assert skips.total == 0
    assert [(e.id, e.text, ["no", "yes"][e.label]) for e in examples] == [
        (ref[i]["id"], ref[i]["ocr"], ref[i]["class_name"]) for i in range(len(ref))
    ]
    bad = hateful_memes(tmp_path, "bad", [1, 0], seed=5, extra_lines=[
        '{"id": 9, "img": "img/00009.png", "label": 1, "text": "x"',  # cut short
        '{"id": 10, "img": "img/00010.png", "text": "no label"}',
        '{"id": 11, "img": "img/missing.png", "label": 0, "text": "y"}',
    ])  # fmt: skip
    examples, skips = load_hateful_memes(bad["annotations"], bad["images"])
    assert len(examples) == 2
    assert skips.counts == {"malformed_line": 1, "malformed_record": 1, "missing_image": 1}
    assert "bad.jsonl: line 3" in skips.named[0] and "line 4" in skips.named[1] and "'label' missing" in skips.named[1]


def test_image_folder_follows_torchvision_and_names_its_problems(tmp_path):
    from torchvision.datasets import ImageFolder

    split = image_folder(tmp_path, "train", [2, 3, 1], seed=7)
    (tmp_path / "train" / "n00000001" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "n00000003").mkdir()  # an empty class folder
    examples, skips = load_image_folder(split["images"], num_class_names=5)
    ref = ImageFolder(split["images"], allow_empty=True)
    assert [(e.id, e.image_path, e.label) for e in examples] == [(i, p, t) for i, (p, t) in enumerate(ref.samples)]
    assert skips.counts == {"empty_class_folder": 1} and "n00000003" in skips.named[0]
    with pytest.raises(ValueError, match=r"4 class folders but there are only 3 class names"):
        load_image_folder(split["images"], num_class_names=3)

    flat = tmp_path / "flat"
    write_image(flat / "a.jpg", seed=1)
    with pytest.raises(ValueError, match=rf"images: {flat} has no class subfolders"):
        EvalSplitConfig(format="imagefolder", images=str(flat))


def test_class_names_file_and_config_errors(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("tench\ngreat white shark\n")
    assert read_class_names(names) == ("tench", "great white shark")
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"blank lines: \[2\]"):
        read_class_names(tmp_path / "blank.txt")
    split = EvalSplitConfig(**image_folder(tmp_path, "train", [1, 1], seed=3))
    missing = tmp_path / "nope" / "classnames.txt"
    with pytest.raises(ValueError, match=rf"class_names: file not found: {missing}"):
        EvaluatorConfig(name="in", benchmark="imagenet", train=split, test=split, class_names=str(missing))
    with pytest.raises(ValueError, match=r"benchmark: classification needs one"):
        EvaluatorConfig(name="in", kind="classification", train=split, test=split)
    with pytest.raises(ValueError, match=r"kind: imagenet is a classification benchmark, not vqa"):
        EvaluatorConfig(name="in", kind="vqa", benchmark="imagenet", train=split, test=split)
    with pytest.raises(ValueError, match=r"benchmark: unknown 'imagenet21k'"):
        EvaluatorConfig(name="in", benchmark="imagenet21k", train=split, test=split)
    hm = EvalSplitConfig(**hateful_memes(tmp_path, "hm", [0, 1], seed=2))
    with pytest.raises(ValueError, match=r"format 'hateful_memes' is not one of imagenet's \['imagefolder'\]"):
        EvaluatorConfig(name="in", benchmark="imagenet", train=hm, test=split)


def test_imagenet_class_names_are_the_reference_list():
    from open_flamingo.eval.classification_utils import HM_CLASSNAMES, IMAGENET_CLASSNAMES

    from flamingo_composer.eval.benchmarks import BENCHMARKS

    assert list(BENCHMARKS["imagenet"].class_names) == IMAGENET_CLASSNAMES
    assert list(BENCHMARKS["hateful_memes"].class_names) == HM_CLASSNAMES


# ----------------------------------------------------------------------------------------------------- metrics


def test_roc_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(4, 40))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.random(n) if trial % 2 else rng.integers(0, 4, n) / 4  # odd trials: many ties
        assert roc_auc(labels.tolist(), scores.tolist()) == pytest.approx(100 * roc_auc_score(labels, scores))
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))  # one class only: undefined (scikit-learn raises)


# ------------------------------------------------------------------------------------------------------- RICES


@pytest.fixture(scope="module")
def rices_setup(tmp_path_factory):
    """A tiny open_clip model registered by name (no weights to fetch), and a pool / queries of small images."""
    import open_clip

    from flamingo_composer.models.tiny import TINY_VISION_CONFIGS

    root = tmp_path_factory.mktemp("rices")
    config = root / "rices-tiny-clip.json"
    config.write_text(json.dumps(TINY_VISION_CONFIGS["tiny-vit"]))
    open_clip.add_model_config(config)
    pool = [str(write_image(root / "pool" / f"{i}.png", seed=300 + i)) for i in range(12)]
    queries = [str(write_image(root / "query" / f"{i}.png", seed=400 + i)) for i in range(5)]
    return {"name": "rices-tiny-clip", "pool": pool, "queries": queries, "root": root}


def test_rices_picks_the_reference_demos(rices_setup):
    import sys

    import reference_oracle
    from PIL import Image

    from flamingo_composer.eval.rices import Rices

    reference_oracle.reference_evaluate_module()  # its eval folder on sys.path (rices imports utils)
    ref_rices = sys.modules["rices"]
    dataset = [{"image": Image.open(p).convert("RGB"), "index": i} for i, p in enumerate(rices_setup["pool"])]
    torch.manual_seed(0)
    ref = ref_rices.RICES(dataset, "cpu", 4, vision_encoder_path=rices_setup["name"], vision_encoder_pretrained=None)
    ours = Rices(rices_setup["pool"], ref.model, ref.image_processor, batch_size=5)
    torch.testing.assert_close(ours.pool, ref.features, rtol=0, atol=1e-5)
    images = [Image.open(p).convert("RGB") for p in rices_setup["queries"]]
    for k in (1, 3, 5):
        want = [[item["index"] for item in row] for row in ref.find(images, k)]
        assert ours.retrieve(rices_setup["queries"], k) == want
    # given the same (cached) features, the same picks
    ref_cached = ref_rices.RICES(dataset, "cpu", 4, vision_encoder_path=rices_setup["name"],
                                 vision_encoder_pretrained=None, cached_features=ours.pool)  # fmt: skip
    ref_cached.model = ref.model
    want = [[item["index"] for item in row] for row in ref_cached.find(images, 4)]
    assert ours.retrieve(rices_setup["queries"], 4) == want


def test_rices_cache_file_is_reused_and_ties_are_deterministic(rices_setup, monkeypatch):
    import open_clip

    from flamingo_composer.eval import rices

    model, _, transform = open_clip.create_model_and_transforms(rices_setup["name"], pretrained=None)
    cache = rices_setup["root"] / "pool-features.pt"
    first = rices.Rices(rices_setup["pool"], model, transform, cache=str(cache))
    assert cache.is_file()
    computed = []
    monkeypatch.setattr(rices.Rices, "features", lambda self, paths: computed.append(len(paths)) or
                        torch.nn.functional.normalize(torch.randn(len(paths), first.pool.shape[1]),
                                                      dim=-1))  # fmt: skip
    again = rices.Rices(rices_setup["pool"], model, transform, cache=str(cache))
    assert computed == [] and torch.equal(again.pool, first.pool)  # read back, nothing recomputed
    rices.Rices(rices_setup["pool"][:-1], model, transform, cache=str(cache))  # another pool: recomputed
    assert computed == [11]

    pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), dim=-1)
    assert rices.nearest(torch.tensor([[1.0, 0.0]]), pool, 3) == [[3, 2, 0]]  # ties: lower index more similar


def test_frozen_tower_pooled_features_are_clip_image_embeddings():
    """Our model's open_clip ViT (set up to return its tokens too) gives the pooled embedding that open_clip's
    `encode_image` (= `visual(images)` without tokens) gives."""
    from flamingo_composer.eval.rices import pooled_features
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    tower = build_flamingo(tiny_model_config("gpt_neox")).model.vision_encoder
    images = torch.randn(3, 3, 32, 32)
    pooled = pooled_features(tower, images)
    assert tower.output_tokens and pooled.shape == (3, 32)
    tower.output_tokens = False
    torch.testing.assert_close(pooled, tower(images), rtol=0, atol=0)


def test_a_task_with_rices_takes_the_nearest_train_images_as_demos(tmp_path):
    """An evaluator with `rices: {tower: model}`: each query's demos are its nearest train images by the frozen
    tower's pooled features (most similar last), the pool's features land in the cache file; without the tower
    (a training evaluator) it is refused at construction."""
    from flamingo_composer.eval.config import RicesConfig
    from flamingo_composer.eval.rices import nearest, normalized, pooled_features
    from flamingo_composer.eval.tasks import build_task
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    bundle = build_flamingo(tiny_model_config("gpt_neox"))
    train, test = vizwiz(tmp_path, "train", 6, seed=30), vizwiz(tmp_path, "val", 3, seed=40)
    cache = tmp_path / "vizwiz-train-features.pt"
    cfg = EvaluatorConfig(name="vizwiz", benchmark="vizwiz", train=EvalSplitConfig(**train),
                          test=EvalSplitConfig(**test), shots=[2],
                          rices=RicesConfig(tower="model", cache=str(cache)))  # fmt: skip
    with pytest.raises(ValueError, match=r"rices.tower 'model' needs the model's tower"):
        build_task(cfg, bundle.tokenizer, bundle.image_transform)
    task = build_task(cfg, bundle.tokenizer, bundle.image_transform, vision_encoder=bundle.model.vision_encoder)
    plan = task.plan(2, 0)
    assert cache.is_file()

    def features(examples):
        from flamingo_composer.eval.generation import load_image

        images = torch.stack([bundle.image_transform(load_image(e.image_path)) for e in examples])
        return normalized(pooled_features(bundle.model.vision_encoder, images))

    want = nearest(features([task.test[q] for q in plan.queries]), features(task.train), 2)
    assert plan.demos == want and all(len(set(d)) == 2 for d in plan.demos)
