"""The reference's eight benchmarks, each defined once: task kind, metric, table title, the data layouts it reads,
and what sets it apart (OK-VQA's stemming, TextVQA's longer answers, VizWiz / TextVQA image naming, the class names
and prompt of the two classification tasks). An evaluator names one with `benchmark:`; kept free of heavy imports
(the config module imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

from flamingo_composer.eval.imagenet_classnames import IMAGENET_CLASSNAMES


@dataclass(frozen=True)
class Benchmark:
    name: str  # the `benchmark:` key
    title: str  # the results table's row label, as the reference's model cards write it
    kind: str  # captioning | vqa | classification
    metric: str  # the logged metric and table value
    formats: tuple[str, ...]  # split formats (config.SPLIT_FORMATS) that hold its data
    max_new_tokens: int | None = None  # None: the kind's default (config.DEFAULT_MAX_NEW_TOKENS)
    stem_answers: bool = False  # OK-VQA: answers stemmed before scoring (ok_vqa.py)
    image_filename: str | None = None  # vqav2 layout: file name from {image_id} (None: COCO naming)
    class_names: tuple[str, ...] = ()  # classification: names in class-index order
    top_k: int = 1  # classification: the top-k reported beside top-1


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("coco", "COCO (CIDEr)", "captioning", "CIDEr", ("karpathy", "coco")),
        Benchmark("vqav2", "VQAv2 (Accuracy)", "vqa", "VQAAccuracy", ("vqav2", "easy_vqa")),
        Benchmark("flickr30k", "Flickr-30K (CIDEr)", "captioning", "CIDEr", ("karpathy",)),
        Benchmark("ok_vqa", "OK-VQA (Accuracy)", "vqa", "VQAAccuracy", ("vqav2",), stem_answers=True),
        Benchmark("textvqa", "TextVQA (Accuracy)", "vqa", "VQAAccuracy", ("vqav2", "textvqa"), max_new_tokens=10,
                  image_filename="{image_id}.jpg"),
        Benchmark("vizwiz", "VizWiz (Accuracy)", "vqa", "VQAAccuracy", ("vqav2", "vizwiz"),
                  image_filename="{image_id}"),
        Benchmark("imagenet", "ImageNet (Top-1 Accuracy)", "classification", "Top1Accuracy", ("imagefolder",),
                  class_names=IMAGENET_CLASSNAMES, top_k=5),
        Benchmark("hateful_memes", "Hateful Memes (ROC AUC)", "classification", "ROC_AUC", ("hateful_memes",),
                  class_names=("no", "yes")),
    )
}  # fmt: skip
# Every metric an evaluator can log (the Composer model registers one pair per name).
METRIC_NAMES_ALL = ("CIDEr", "VQAAccuracy", "Top1Accuracy", "ROC_AUC")


def benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; ValueError listing the known ones otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark: unknown {name!r}; known: {list(BENCHMARKS)}")
    return BENCHMARKS[name]
