"""The `evaluators:` section of a training recipe (and of flamingo-evaluate): one few-shot task per entry.

Plain dataclasses validated by the training config's `from_dict` (unknown keys, types); constructing one checks
that every annotation/question/class-name file and image folder exists (an ImageFolder tree must have class
subfolders), so a wrong path stops the run before any model is built, with the key and the path named. Kept free
of heavy imports (the config module imports it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from flamingo_composer.eval.benchmarks import BENCHMARKS, benchmark

KINDS = ("captioning", "vqa", "classification")
METRIC_NAMES = {"captioning": "CIDEr", "vqa": "VQAAccuracy"}  # classification: the benchmark's own
DEFAULT_MAX_NEW_TOKENS = {"captioning": 20, "vqa": 5}
SPLIT_FORMATS = {  # format -> (kind it serves, required keys)
    "karpathy": ("captioning", ("annotations", "images")),
    "coco": ("captioning", ("annotations", "images")),
    "vqav2": ("vqa", ("questions", "annotations", "images")),
    "easy_vqa": ("vqa", ()),
    "vizwiz": ("vqa", ("annotations", "images")),
    "textvqa": ("vqa", ("annotations", "images")),
    "hateful_memes": ("classification", ("annotations", "images")),
    "imagefolder": ("classification", ("images",)),
}


@dataclass
class EvalSplitConfig:
    """Where one split's examples come from.

    karpathy: `annotations` = dataset_coco.json, `images` = root (holding train2014/, val2014/ or the files),
      `split` = the Karpathy split to keep (default 'train' for demos, 'test' for queries).
    coco: `annotations` = captions_*.json, `images` = its image folder.
    vqav2: `questions`, `annotations` (official JSON layout), `images`; `image_filename` a format string with
      {image_id} (default: COCO_<folder>_<id:012d>.jpg as the reference).
    easy_vqa: the installed easy-vqa package in the VQAv2 layout; `split` 'train' or 'test' (default by role).
    vizwiz: VizWiz's own `annotations` (train.json / val.json: a list of {image, question, answers}), `images`.
    textvqa: TextVQA's own `annotations` (TextVQA_0.5.1_*.json: {data: [{question_id, image_id, question,
      answers}]}), `images` (train_images/, holding {image_id}.jpg).
    hateful_memes: `annotations` = train.jsonl / dev_seen.jsonl (one {id, img, label, text} per line), `images`
      = the folder holding the files `img` names (its last path part).
    imagefolder: `images` = an ImageFolder tree (ImageNet's train/ or val/: one subfolder per class, sorted names
      give the class indices).
    """

    format: Literal["karpathy", "coco", "vqav2", "easy_vqa", "vizwiz", "textvqa", "hateful_memes", "imagefolder"]
    annotations: str | None = None
    questions: str | None = None
    images: str | None = None
    split: str | None = None
    image_filename: str | None = None

    def __post_init__(self) -> None:
        _, required = SPLIT_FORMATS[self.format]
        for key in required:
            if getattr(self, key) is None:
                raise ValueError(f"{key}: required for format {self.format!r}")
        for key in ("annotations", "questions"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{key}: file not found: {path}")
        if self.images is not None and not os.path.isdir(self.images):
            raise ValueError(f"images: folder not found: {self.images}")
        if self.format == "imagefolder" and not any(e.is_dir() for e in os.scandir(self.images)):
            raise ValueError(f"images: {self.images} has no class subfolders (an ImageFolder tree: one per class)")
        if self.format == "easy_vqa" and self.split not in (None, "train", "test"):
            raise ValueError(f"split: easy_vqa has 'train' and 'test', got {self.split!r}")
        if self.image_filename is not None and "{image_id" not in self.image_filename:
            raise ValueError(f"image_filename: must contain {{image_id}}, got {self.image_filename!r}")


@dataclass
class RicesConfig:
    """Demonstrations retrieved by image similarity (RICES) instead of drawn at random.

    tower 'model': the evaluated model's frozen vision tower (its pooled features); 'open_clip': a separate
    open_clip model (`open_clip_model`, `open_clip_pretrained`), as the reference does. `cache`: a file holding the
    demonstration pool's features, written on first use and read afterwards (rebuilt when it describes another
    pool or tower).
    """

    tower: Literal["model", "open_clip"] = "model"
    open_clip_model: str = "ViT-L-14"
    open_clip_pretrained: str | None = "openai"
    cache: str | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.cache is not None and not os.path.isdir(os.path.dirname(os.path.abspath(self.cache))):
            raise ValueError(f"cache: folder of {self.cache} not found")


@dataclass
class EvaluatorConfig:
    """One few-shot benchmark: demos drawn from `train`, queries from `test`, the reference's protocol.

    `benchmark` (benchmarks.py) names one of the reference's eight and gives the kind, metric and its particulars;
    without it, `kind` says captioning or vqa. Logged as metrics/eval/<name>_<k>shot/<metric> = mean over trials,
    and .../<metric>_std. Classification: `class_names` a text file, one name per line in class-index order (default:
    the benchmark's), `prompt_ensembling` as the reference's flag, `kv_cache: false` the slow uncached path,
    `class_batch_rows` (query, class name) rows per LM call (the memory knob, see classification.py).
    """

    name: str
    train: EvalSplitConfig
    test: EvalSplitConfig
    kind: Literal["captioning", "vqa", "classification"] | None = None
    benchmark: str | None = None
    shots: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32])
    num_trials: int = 1
    trial_seeds: list[int] = field(default_factory=lambda: [42])
    num_samples: int = -1  # queries per trial; <= 0: the whole test split
    query_set_size: int = 2048  # train examples the demos are drawn from
    batch_size: int = 8
    num_beams: int = 3
    length_penalty: float = 0.0
    max_new_tokens: int | None = None  # None: 20 for captioning, 5 for VQA
    min_new_tokens: int = 0
    greedy: bool = False  # one beam instead of beam search
    caption_tokenizer: Literal["auto", "ptb-java", "ptb-python"] = "auto"  # auto: java PTB when java exists
    image_cache_size: int = 256  # transformed images kept in memory (demo images recur across queries)
    class_names: str | None = None
    prompt_ensembling: bool = False
    kv_cache: bool = True
    class_batch_rows: int = 64
    rices: RicesConfig | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(
                f"name: use letters, digits, '_', '-', '.' only (it names metrics), got {self.name!r}"
            )
        self._check_benchmark()
        for role in ("train", "test"):
            split = getattr(self, role)
            if SPLIT_FORMATS[split.format][0] != self.kind:
                raise ValueError(f"{role}: format {split.format!r} does not hold {self.kind} data")
            if self.benchmark is not None and split.format not in BENCHMARKS[self.benchmark].formats:
                raise ValueError(
                    f"{role}: format {split.format!r} is not one of {self.benchmark}'s "
                    f"{list(BENCHMARKS[self.benchmark].formats)}"
                )
            default_name = BENCHMARKS[self.benchmark].image_filename if self.benchmark else None
            if split.format == "vqav2" and split.image_filename is None and default_name is not None:
                split.image_filename = default_name
        if self.class_names is not None:
            if self.kind != "classification":
                raise ValueError(f"class_names: only classification benchmarks rank class names ({self.kind})")
            if not os.path.isfile(self.class_names):
                raise ValueError(f"class_names: file not found: {self.class_names}")
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"shots: a non-empty list of shot counts >= 0, got {self.shots}")
        if self.num_trials < 1 or len(self.trial_seeds) != self.num_trials:
            raise ValueError(
                f"trial_seeds: one seed per trial is needed (num_trials {self.num_trials}, seeds {self.trial_seeds})"
            )
        for key in ("batch_size", "num_beams", "query_set_size", "class_batch_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")

    def _check_benchmark(self) -> None:
        if self.benchmark is None:
            if self.kind is None:
                raise ValueError(f"kind: required without a benchmark (one of {list(KINDS)})")
            if self.kind == "classification":
                raise ValueError(
                    f"benchmark: classification needs one (its class names and prompt): {list(BENCHMARKS)}"
                )
            return
        spec = benchmark(self.benchmark)
        if self.kind is not None and self.kind != spec.kind:
            raise ValueError(f"kind: {self.benchmark} is a {spec.kind} benchmark, not {self.kind}")
        self.kind = spec.kind
        if spec.stem_answers:
            from flamingo_composer.eval.ok_vqa import check_nltk_data

            check_nltk_data()  # NLTK's data for the answer stemming, before any model is built

    @property
    def spec(self):
        """The benchmark's definition (benchmarks.Benchmark), or None for a plain captioning / VQA task."""
        return BENCHMARKS[self.benchmark] if self.benchmark is not None else None

    @property
    def metric_name(self) -> str:
        return self.spec.metric if self.spec is not None else METRIC_NAMES[self.kind]

    @property
    def generation_length(self) -> int:
        """max_new_tokens, else the benchmark's (TextVQA: 10), else the kind's default."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        spec = self.spec
        if spec is not None and spec.max_new_tokens is not None:
            return spec.max_new_tokens
        return DEFAULT_MAX_NEW_TOKENS.get(self.kind, 0)  # classification generates nothing

    def label(self, shot: int) -> str:
        """The Evaluator label: metrics are logged as metrics/<label>/<metric>."""
        return f"eval/{self.name}_{shot}shot"
