"""Classification data: HatefulMemes (its jsonl + image folder), an ImageFolder tree (ImageNet), class-name files.

Examples keep the reference's ids (HatefulMemes: the record's `id`; ImageFolder: the position in torchvision's
ImageFolder order, which the reference's ImageNet dataset uses), so prediction files line up with its own.
Bad input as for the other readers (datasets.py): a malformed jsonl line, a record with a missing or mistyped
field, a missing image or an empty class folder is skipped and counted by reason, the first few named; a missing
file or folder raises naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flamingo_composer.eval.datasets import SkipLog, _checked_image, _field

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder takes (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HATEFUL_MEMES_LABELS = {0: 0, 1: 1}  # the jsonl's label -> class index ("no", "yes")


@dataclass(frozen=True)
class ClassExample:
    """One image with its class index; `text` is the meme's OCR text (HatefulMemes) or None."""

    id: Any
    image_path: str
    label: int
    text: str | None = None


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """One class name per line, in class-index order (surrounding whitespace stripped, blank lines refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    names = tuple(line.strip() for line in lines)
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if not names or blank:
        raise ValueError(f"class-name file {path}: one non-empty name per line expected (blank lines: {blank[:5]})")
    return names


def load_hateful_memes(jsonl_path: str, image_dir: str) -> tuple[list[ClassExample], SkipLog]:
    """HatefulMemes jsonl (`id`, `img` e.g. 'img/01235.png', `label` 0/1, `text`) -> examples in file order."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"HatefulMemes annotations file not found: {path}")
    examples, skips = [], SkipLog()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}: line {number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                skips.skip("malformed_line", f"{where}: not JSON ({exc.msg})")
                continue
            try:
                record_id = _field(record, "id", (int, str))
                image = _field(record, "img", str)
                label = _field(record, "label", int)
                text = _field(record, "text", str)
                if label not in HATEFUL_MEMES_LABELS:
                    raise ValueError(f"field 'label' is {label}, not 0 or 1")
            except (KeyError, TypeError, ValueError) as exc:
                skips.skip("malformed_record", f"{where}: {exc}")
                continue
            image_path = os.path.join(image_dir, image.split("/")[-1])
            if _checked_image(image_path, f"{where} (id {record_id})", skips):
                examples.append(ClassExample(record_id, image_path, HATEFUL_MEMES_LABELS[label], text))
    return examples, skips


def load_image_folder(root: str, num_class_names: int) -> tuple[list[ClassExample], SkipLog]:
    """An ImageFolder tree: class index = position of the subfolder in sorted order; files as torchvision orders
    them (sorted walk, sorted names, IMAGE_EXTENSIONS). More class folders than class names is an error."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders (an ImageFolder tree: one per class)")
    if len(classes) > num_class_names:
        raise ValueError(
            f"image folder {root} has {len(classes)} class folders but there are only {num_class_names} class names"
        )
    examples, skips = [], SkipLog()
    for label, name in enumerate(classes):
        found = 0
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for filename in sorted(files):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    examples.append(ClassExample(len(examples), os.path.join(folder, filename), label))
                    found += 1
        if not found:
            skips.skip("empty_class_folder", f"{root}: class folder {name} (index {label}) holds no image")
    return examples, skips
