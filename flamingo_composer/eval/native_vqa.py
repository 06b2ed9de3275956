"""VizWiz and TextVQA in the layouts their own sites ship, read into the VQAv2 layout the reference's files use
(so the VQAv2 parser, its checks and its skip counts serve them too; no conversion script to run).

- VizWiz (train.json / val.json): a list of {image, question, answers: [{answer, answer_confidence}]};
  question_id = the position in the file and image_id = the image's file name, as the reference's converted
  files number them.
- TextVQA (TextVQA_0.5.1_train.json / _val.json): {data: [{question_id, image_id, question, answers: [str]}]};
  images are {image_id}.jpg in train_images/ (the file names: benchmarks.py).
A record that is not an object, or lacks a field, is passed on as it is and skipped, named and counted, by
`parse_vqav2`.
"""

from __future__ import annotations

from typing import Any

from flamingo_composer.eval.benchmarks import BENCHMARKS
from flamingo_composer.eval.datasets import SkipLog, VQAExample, parse_vqav2, read_json


def vizwiz_to_vqav2(records: Any, path: str) -> tuple[dict, dict]:
    """VizWiz's list -> (questions, annotations) in the VQAv2 layout."""
    if not isinstance(records, list):
        raise ValueError(f"VizWiz annotations file {path}: expected a list of {{image, question, answers}}")
    questions, annotations = [], []
    for qid, record in enumerate(records):
        if not isinstance(record, dict):
            questions.append(record)
            continue
        questions.append({"question_id": qid, "image_id": record.get("image"), "question": record.get("question")})
        annotations.append({"question_id": qid, "answers": record.get("answers")})
    return {"questions": questions}, {"annotations": annotations}


def textvqa_to_vqav2(data: Any, path: str) -> tuple[dict, dict]:
    """TextVQA's {data: [...]} -> (questions, annotations) in the VQAv2 layout (answers: strings -> objects)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"TextVQA annotations file {path}: expected an object with a 'data' list")
    questions, annotations = [], []
    for record in data["data"]:
        if not isinstance(record, dict):
            questions.append(record)
            continue
        answers = record.get("answers")
        if isinstance(answers, list):
            answers = [{"answer": a} if isinstance(a, str) else a for a in answers]
        qid = record.get("question_id")
        questions.append({"question_id": qid, "image_id": record.get("image_id"), "question": record.get("question")})
        annotations.append({"question_id": qid, "answers": answers})
    return {"questions": questions}, {"annotations": annotations}


def load_vizwiz(path: str, image_dir: str) -> tuple[list[VQAExample], SkipLog]:
    questions, annotations = vizwiz_to_vqav2(read_json(path, "VizWiz annotations"), path)
    return parse_vqav2(questions, annotations, image_dir, image_filename=BENCHMARKS["vizwiz"].image_filename,
                       questions_name=path, annotations_name=path)  # fmt: skip


def load_textvqa(path: str, image_dir: str) -> tuple[list[VQAExample], SkipLog]:
    questions, annotations = textvqa_to_vqav2(read_json(path, "TextVQA annotations"), path)
    return parse_vqav2(questions, annotations, image_dir, image_filename=BENCHMARKS["textvqa"].image_filename,
                       questions_name=path, annotations_name=path)  # fmt: skip
