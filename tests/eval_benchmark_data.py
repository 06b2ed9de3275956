"""Small hand-made benchmark data in each layout the evaluators read (Flickr30K Karpathy JSON, OK-VQA in the VQAv2
layout with COCO file names, VizWiz and TextVQA native JSON, HatefulMemes jsonl, an ImageNet-style ImageFolder
tree), and a tiny NLTK data folder for OK-VQA's stemming (a perceptron tagger trained here, a WordNet of a few
verbs, empty Punkt parameters), so the tests need nothing from the network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flamingo_composer.vocab import WORDS


def write_image(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def flickr(root: Path, n_train: int = 6, n_test: int = 4) -> dict:
    """dataset_flickr30k.json (Karpathy layout: no cocoid, ids are file stems) + flickr30k_images/."""
    images = root / "flickr30k_images"
    entries = []
    for i in range(n_train + n_test):
        name = f"{1000 + i}.jpg"
        write_image(images / name, seed=100 + i)
        entries.append({"filename": name, "imgid": i, "split": "train" if i < n_train else "test",
                        "sentences": [{"raw": words(i, 4)}, {"raw": words(50 + i, 3)}]})  # fmt: skip
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return {"format": "karpathy", "annotations": str(path), "images": str(images)}


def ok_vqa(root: Path, folder: str, n: int, seed: int) -> dict:
    """OK-VQA's files in the VQAv2 layout, images named COCO_<folder>_<id:012d>.jpg in a folder named `folder`."""
    images = root / folder
    questions, annotations = [], []
    for i in range(n):
        image_id = seed * 100 + i
        write_image(images / f"COCO_{folder}_{image_id:012d}.jpg", seed=seed + i)
        questions.append({"question_id": image_id * 10, "image_id": image_id, "question": f"what {words(i, 2)}?"})
        answers = [{"answer": a, "answer_id": j} for j, a in enumerate(["dogs", "running", "dog", "red"] * 3)]
        annotations.append({"question_id": image_id * 10, "image_id": image_id, "answers": answers[:10]})
    (root / f"{folder}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"{folder}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return {"format": "vqav2", "questions": str(root / f"{folder}_questions.json"),
            "annotations": str(root / f"{folder}_annotations.json"), "images": str(images)}  # fmt: skip


def vizwiz(root: Path, split: str, n: int, seed: int) -> dict:
    """VizWiz's own layout: <split>.json, a list of {image, question, answers, answerable, answer_type}."""
    records = []
    for i in range(n):
        name = f"VizWiz_{split}_{i:08d}.jpg"
        write_image(root / split / name, seed=seed + i)
        answers = [{"answer": a, "answer_confidence": "yes"} for a in ["red", "blue", "red", "unanswerable"] * 3]
        records.append({"image": name, "question": f"what is {words(seed + i, 2)}?", "answers": answers[:10],
                        "answer_type": "other", "answerable": 1})  # fmt: skip
    path = root / f"{split}.json"
    path.write_text(json.dumps(records))
    return {"format": "vizwiz", "annotations": str(path), "images": str(root / split)}


def textvqa(root: Path, split: str, n: int, seed: int) -> dict:
    """TextVQA's own layout: TextVQA_0.5.1_<split>.json {data: [...]}, images {image_id}.jpg in train_images/."""
    data = []
    for i in range(n):
        image_id = f"{seed:04x}{i:012x}"
        write_image(root / "train_images" / f"{image_id}.jpg", seed=seed + i)
        data.append({"question": f"what does it say {words(seed + i, 1)}?", "image_id": image_id,
                     "question_id": seed * 1000 + i, "answers": ["stop", "stop sign", "stop"] * 3 + ["go"],
                     "set_name": split, "image_classes": ["Sign"]})  # fmt: skip
    path = root / f"TextVQA_0.5.1_{split}.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    return {"format": "textvqa", "annotations": str(path), "images": str(root / "train_images")}


def hateful_memes(root: Path, name: str, labels: list[int], seed: int, extra_lines: list[str] = ()) -> dict:
    """<name>.jsonl ({id, img: 'img/<id>.png', label, text} per line) + img/; `extra_lines` appended as they are."""
    lines = []
    for i, label in enumerate(labels):
        record_id = seed * 100 + i
        write_image(root / "img" / f"{record_id:05d}.png", seed=seed + i)
        lines.append(json.dumps({"id": record_id, "img": f"img/{record_id:05d}.png", "label": label,
                                 "text": words(seed + i, 3)}))  # fmt: skip
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return {"format": "hateful_memes", "annotations": str(path), "images": str(root / "img")}


def image_folder(root: Path, split: str, per_class: list[int], seed: int) -> dict:
    """An ImageFolder tree <split>/n0000000<c>/<i>.jpg (folder names sort in class order)."""
    for c, count in enumerate(per_class):
        for i in range(count):
            write_image(root / split / f"n{c:08d}" / f"{split}_{c}_{i}.JPEG", seed=seed + 10 * c + i)
    return {"format": "imagefolder", "images": str(root / split)}


def nltk_data(root: Path) -> Path:
    """A tiny NLTK data folder: punkt_tab (no abbreviations), a perceptron tagger trained on a few tagged phrases,
    a WordNet with a few verbs (their index lines, an exception list), enough for OK-VQA's stemming code."""
    from nltk.tag.perceptron import PerceptronTagger

    wordnet = root / "corpora" / "wordnet"
    wordnet.mkdir(parents=True, exist_ok=True)
    (wordnet / "lexnames").write_text("00\tadj.all\t3\n01\tadj.pert\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n")
    verbs = sorted(["ride", "surf", "ski", "skate", "swim", "run", "fly", "eat", "text", "sail"])
    for suffix in ("noun", "verb", "adj", "adv"):
        index = [f"{v} v 1 0 1 0 {1000 + j:08d}  \n" for j, v in enumerate(verbs)] if suffix == "verb" else []
        (wordnet / f"index.{suffix}").write_text("".join(index))
        (wordnet / f"data.{suffix}").write_text("")
        (wordnet / f"{suffix}.exc").write_text("ran run\nflew fly\nswam swim\n" if suffix == "verb" else "")
    (wordnet / "index.sense").write_text("")
    tagged = [
        [("the", "DT"), ("dogs", "NNS"), ("are", "VBP"), ("running", "VBG")], [("surfing", "VBG")],
        [("two", "CD"), ("cats", "NNS")], [("red", "JJ"), ("apples", "NNS")], [("a", "DT"), ("frisbee", "NN")],
        [("skiing", "NN")], [("bananas", "NNS")], [("Americans", "NNPS")], [("eating", "VBG"), ("pizza", "NN")],
    ]  # fmt: skip
    tagger = PerceptronTagger(load=False)
    tagger.train(tagged, nr_iter=5)
    tagger_dir = root / "taggers" / "averaged_perceptron_tagger_eng"
    tagger_dir.mkdir(parents=True, exist_ok=True)
    tagger.save_to_json("eng", str(tagger_dir))
    punkt = root / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).write_text("")
    return root


@pytest.fixture(scope="module", name="tiny_nltk")
def tiny_nltk_fixture(tmp_path_factory):
    """The `tiny_nltk` fixture: `nltk_data` on NLTK's search path, for the module that imports it."""
    import nltk

    root = nltk_data(tmp_path_factory.mktemp("nltk_data"))
    nltk.data.path.insert(0, str(root))
    yield root
    nltk.data.path.remove(str(root))
