"""Evaluation data: COCO captions (Karpathy-split JSON or COCO `captions_*.json`) and VQAv2 (questions +
annotations JSON), each with an image folder, read into plain example records.

Bad input: a record with missing or mistyped fields, or whose image file does not exist, is skipped and counted
by reason in a `SkipLog` (the first few named by file and record, all logged at WARNING); a missing annotation
file raises FileNotFoundError naming it (the config checks this before training starts).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_NAMED_SKIPS = 5


@dataclass(frozen=True)
class CaptionExample:
    """One image: `caption` (the first reference, used as a demo's caption) and all `references` (for CIDEr)."""

    id: Any  # COCO image id (int) or the file stem
    image_path: str
    caption: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class VQAExample:
    """One question: `answers` are the human answers in annotation order (a demo uses the first)."""

    id: Any  # question id
    image_path: str
    question: str
    answers: tuple[str, ...]


@dataclass
class SkipLog:
    """Records left out, by reason, with the first few named ('file: record ...')."""

    counts: Counter = field(default_factory=Counter)
    named: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.named) < MAX_NAMED_SKIPS:
            self.named.append(f"{reason}: {where}")
        log.warning("skipped eval record (%s): %s", reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "examples": list(self.named),
        }


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from exc


def _field(record: Any, name: str, types: type | tuple[type, ...]) -> Any:
    """record[name] checked against `types`; KeyError/TypeError with the field named."""
    if not isinstance(record, dict):
        raise TypeError(f"record is {type(record).__name__}, not an object")
    if name not in record:
        raise KeyError(f"field '{name}' missing")
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
        raise TypeError(f"field '{name}' is {type(value).__name__} {value!r}")
    return value


def _checked_image(path: str, where: str, skips: SkipLog) -> bool:
    if os.path.isfile(path):
        return True
    skips.skip("missing_image", f"{where}: image {path} does not exist")
    return False


# ------------------------------------------------------------------------------------------------ captions


def load_karpathy(json_path: str, image_dir: str, split: str) -> tuple[list[CaptionExample], SkipLog]:
    """Karpathy `dataset_coco.json` (`images[*]` with split, filepath, filename, cocoid, sentences[*].raw).

    Keeps the entries whose `split` equals `split` ('train', 'test', 'val' or 'restval'), as the reference does
    ('train' for demos, 'test' for queries). Image path: image_dir/filepath/filename when that exists (the COCO
    layout with train2014/ and val2014/ folders under one root), else image_dir/filename.
    """
    data = read_json(json_path, "Karpathy captions")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"Karpathy captions file {json_path}: expected an object with an 'images' list")
    examples, skips = [], SkipLog()
    for i, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        try:
            if _field(entry, "split", str) != split:
                continue
            filename = _field(entry, "filename", str)
            sentences = _field(entry, "sentences", list)
            references = tuple(_field(s, "raw", str) for s in sentences)
            if not references:
                raise ValueError("no sentences")
            image_id = entry.get("cocoid", Path(filename).stem)
        except (KeyError, TypeError, ValueError) as exc:
            skips.skip("malformed_record", f"{where}: {exc}")
            continue
        nested = os.path.join(image_dir, str(entry.get("filepath", "")), filename)
        path = nested if os.path.isfile(nested) else os.path.join(image_dir, filename)
        if _checked_image(path, f"{where} (cocoid {image_id})", skips):
            examples.append(CaptionExample(image_id, path, references[0], references))
    return examples, skips


def load_coco_captions(json_path: str, image_dir: str) -> tuple[list[CaptionExample], SkipLog]:
    """COCO `captions_*.json`: `images[*]` (id, file_name) and `annotations[*]` (image_id, caption).

    One example per image with at least one caption; its first caption in file order is the demo caption.
    """
    data = read_json(json_path, "COCO captions")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(
            f"COCO captions file {json_path}: expected an object with 'images' and 'annotations' lists"
        )
    skips = SkipLog()
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id = _field(ann, "image_id", (int, str))
            captions.setdefault(image_id, []).append(_field(ann, "caption", str))
        except (KeyError, TypeError) as exc:
            skips.skip("malformed_record", f"{json_path}: annotations[{i}]: {exc}")
    examples = []
    for i, image in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        try:
            image_id = _field(image, "id", (int, str))
            filename = _field(image, "file_name", str)
        except (KeyError, TypeError) as exc:
            skips.skip("malformed_record", f"{where}: {exc}")
            continue
        if image_id not in captions:
            skips.skip("no_captions", f"{where} (id {image_id}): no annotation has this image_id")
            continue
        path = os.path.join(image_dir, filename)
        if _checked_image(path, f"{where} (id {image_id})", skips):
            refs = tuple(captions[image_id])
            examples.append(CaptionExample(image_id, path, refs[0], refs))
    return examples, skips


# ----------------------------------------------------------------------------------------------------- VQA


def coco_image_filename(image_dir: str) -> Callable[[Any], str]:
    """The VQAv2 image naming the reference uses: COCO_{folder}_{image_id:012d}.jpg, folder = the dir's name."""
    folder = Path(image_dir.rstrip("/")).name
    return lambda image_id: f"COCO_{folder}_{int(image_id):012d}.jpg"


def parse_vqav2(
    questions: Any,
    annotations: Any,
    image_dir: str,
    *,
    image_filename: str | None = None,
    questions_name: str = "<questions>",
    annotations_name: str = "<annotations>",
) -> tuple[list[VQAExample], SkipLog]:
    """VQAv2 layout (already parsed JSON) -> examples, in question-file order.

    questions: {'questions': [{'question_id', 'image_id', 'question'}]}; annotations: {'annotations':
    [{'question_id', 'answers': [{'answer', ...}]}]}, paired by question_id (the reference pairs by position,
    which needs both files in the same order). `image_filename`: a format string with {image_id} (e.g.
    '{image_id}.png'); None = COCO naming from the folder name.
    """
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"VQA questions file {questions_name}: expected an object with a 'questions' list")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ValueError(
            f"VQA annotations file {annotations_name}: expected an object with an 'annotations' list"
        )
    name_of = (
        (lambda i: image_filename.format(image_id=i)) if image_filename else coco_image_filename(image_dir)
    )
    skips = SkipLog()
    answers: dict[Any, tuple[str, ...]] = {}
    for i, ann in enumerate(annotations["annotations"]):
        qid = None
        try:
            qid = _field(ann, "question_id", (int, str))
            given = _field(ann, "answers", list)
            answers[qid] = tuple(_field(a, "answer", str) for a in given)
            if not answers[qid]:
                raise ValueError("field 'answers' is empty")
        except (KeyError, TypeError, ValueError) as exc:
            answers.pop(qid, None)
            skips.skip("malformed_record", f"{annotations_name}: annotations[{i}]: {exc}")
    examples = []
    for i, q in enumerate(questions["questions"]):
        where = f"{questions_name}: questions[{i}]"
        try:
            qid = _field(q, "question_id", (int, str))
            image_id = _field(q, "image_id", (int, str))
            text = _field(q, "question", str)
        except (KeyError, TypeError) as exc:
            skips.skip("malformed_record", f"{where}: {exc}")
            continue
        if qid not in answers:
            skips.skip(
                "no_annotation", f"{where} (question_id {qid}): no usable record in {annotations_name}"
            )
            continue
        path = os.path.join(image_dir, name_of(image_id))
        if _checked_image(path, f"{where} (question_id {qid})", skips):
            examples.append(VQAExample(qid, path, text, answers[qid]))
    return examples, skips


def load_vqav2(
    questions_path: str, annotations_path: str, image_dir: str, image_filename: str | None = None
) -> tuple[list[VQAExample], SkipLog]:
    """VQAv2 questions + annotations JSON files and the image folder -> examples (see parse_vqav2)."""
    return parse_vqav2(
        read_json(questions_path, "VQA questions"),
        read_json(annotations_path, "VQA annotations"),
        image_dir,
        image_filename=image_filename,
        questions_name=str(questions_path),
        annotations_name=str(annotations_path),
    )
