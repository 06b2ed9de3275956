"""The `evaluators:` section of a training recipe (and of tools/evaluate.py): one few-shot task per entry.

Plain dataclasses validated by the training config's `from_dict` (unknown keys, types); constructing one checks
that every annotation/question file and image folder exists, so a wrong path stops the run before training,
with the key and the path named. Kept free of heavy imports (the config module imports it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

KINDS = ("captioning", "vqa")
METRIC_NAMES = {"captioning": "CIDEr", "vqa": "VQAAccuracy"}
DEFAULT_MAX_NEW_TOKENS = {"captioning": 20, "vqa": 5}
SPLIT_FORMATS = {  # format -> (kinds it serves, required keys)
    "karpathy": ("captioning", ("annotations", "images")),
    "coco": ("captioning", ("annotations", "images")),
    "vqav2": ("vqa", ("questions", "annotations", "images")),
    "easy_vqa": ("vqa", ()),
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
    """

    format: Literal["karpathy", "coco", "vqav2", "easy_vqa"]
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
        if self.format == "easy_vqa" and self.split not in (None, "train", "test"):
            raise ValueError(f"split: easy_vqa has 'train' and 'test', got {self.split!r}")
        if self.image_filename is not None and "{image_id" not in self.image_filename:
            raise ValueError(f"image_filename: must contain {{image_id}}, got {self.image_filename!r}")


@dataclass
class EvaluatorConfig:
    """One few-shot benchmark: demos drawn from `train`, queries from `test`, the reference's protocol.

    Logged as metrics/eval/<name>_<k>shot/CIDEr (or /VQAAccuracy) = mean over trials, and .../<metric>_std.
    """

    name: str
    kind: Literal["captioning", "vqa"]
    train: EvalSplitConfig
    test: EvalSplitConfig
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

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(
                f"name: use letters, digits, '_', '-', '.' only (it names metrics), got {self.name!r}"
            )
        for role in ("train", "test"):
            split = getattr(self, role)
            if SPLIT_FORMATS[split.format][0] != self.kind:
                raise ValueError(f"{role}: format {split.format!r} does not hold {self.kind} data")
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"shots: a non-empty list of shot counts >= 0, got {self.shots}")
        if self.num_trials < 1 or len(self.trial_seeds) != self.num_trials:
            raise ValueError(
                f"trial_seeds: one seed per trial is needed (num_trials {self.num_trials}, seeds {self.trial_seeds})"
            )
        for key in ("batch_size", "num_beams", "query_set_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.kind]

    def label(self, shot: int) -> str:
        """The Evaluator label: metrics are logged as metrics/<label>/<metric>."""
        return f"eval/{self.name}_{shot}shot"
