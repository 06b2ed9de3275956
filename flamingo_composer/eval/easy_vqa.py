"""The `easy-vqa` PyPI package (4,000 train / 1,000 test 64 px shape images, 13 answers, all in the wheel)
presented in the VQAv2 layout, so it goes through the same reader and metric as VQAv2.

easy-vqa has one answer per question; VQAv2 has 10 human answers, and its leave-one-out accuracy gives 0 for a
single answer (no other human agrees). The adapter repeats the answer 10 times, so the metric is exact match after
VQA normalisation. Question ids are the position in the package's question list; image ids its file numbers.
Nothing is downloaded: the package must be installed (`pip install easy-vqa`, a test dependency here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPLITS = ("train", "test")
VQA_ANSWERS_PER_QUESTION = 10


def easy_vqa_root() -> Path:
    """The package's data folder (data/{train,test}/images, questions.json)."""
    try:
        import easy_vqa
    except ImportError as exc:
        raise ImportError(
            "easy-vqa is not installed: pip install easy-vqa (it ships its data in the wheel)"
        ) from exc
    return Path(easy_vqa.__file__).parent / "data"


def easy_vqa_layout(split: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(questions JSON, annotations JSON, image folder) of `split` in the VQAv2 layout; images as '{id}.png'."""
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split must be one of {SPLITS}, got {split!r}")
    root = easy_vqa_root() / split
    with open(root / "questions.json", encoding="utf-8") as f:
        raw = json.load(f)  # [[question, answer, image_id], ...]
    questions, annotations = [], []
    for qid, (question, answer, image_id) in enumerate(raw):
        questions.append({"question_id": qid, "image_id": int(image_id), "question": question})
        annotations.append(
            {
                "question_id": qid,
                "image_id": int(image_id),
                "question_type": question.split(" ", 1)[0],
                "answer_type": "yes/no" if answer in ("yes", "no") else "other",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                    for k in range(VQA_ANSWERS_PER_QUESTION)
                ],
            }
        )
    info = {"description": f"easy-vqa {split} in the VQAv2 layout", "version": "1.0"}
    meta = {
        "info": info,
        "task_type": "Open-Ended",
        "data_type": "easy-vqa",
        "data_subtype": split,
        "license": {},
    }
    return {**meta, "questions": questions}, {**meta, "annotations": annotations}, str(root / "images")


IMAGE_FILENAME = "{image_id}.png"


def write_easy_vqa_vqav2(out_dir: str | Path) -> dict[str, dict[str, str]]:
    """Write {split}_questions.json / {split}_annotations.json under out_dir; returns the paths per split.

    The images stay in the installed package (the returned `images` folder; file names '{image_id}.png').
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        questions, annotations, images = easy_vqa_layout(split)
        q_path, a_path = out_dir / f"{split}_questions.json", out_dir / f"{split}_annotations.json"
        q_path.write_text(json.dumps(questions))
        a_path.write_text(json.dumps(annotations))
        paths[split] = {"questions": str(q_path), "annotations": str(a_path), "images": images}
    return paths
