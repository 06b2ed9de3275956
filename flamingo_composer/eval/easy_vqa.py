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


# ------------------------------------------------------------------------------------------------ training data


def fewshot_training_documents(
    split: str = "train",
    *,
    per_document: int = 5,
    seed: int = 0,
    max_documents: int | None = None,
    balance_answers: bool = True,
) -> list[dict]:
    """easy-vqa questions as MMC4-style documents in the few-shot VQA format, for training on easy-vqa.

    Each document interleaves `per_document` (image, "Question:{q} Short answer:{a}") pairs, so the MMC4
    pipeline makes the evaluation's prompt text (`<image>Question:... Short answer:...<|endofchunk|><image>...`)
    with every answer supervised in context. Questions are shuffled (seeded) and each image is matched to its
    own sentence (similarity 0.3, others 0.1). Images are the package's PNGs, base64 as in MMC4.
    `max_documents` caps the count (small test sets).

    `balance_answers`: easy-vqa's question text alone predicts its answer for 67% of the test questions ("is
    there not a blue shape?" is "yes" 88% of the time), and a model trained on all of it learns that prior long
    before it learns to look. With balancing, each question text keeps the same number of questions per
    answer (the count of its rarest answer, a seeded draw), so only the image tells the answer.
    """
    import base64

    import numpy as np

    questions, annotations, image_dir = easy_vqa_layout(split)
    answers = {a["question_id"]: a["answers"][0]["answer"] for a in annotations["annotations"]}
    rng = np.random.default_rng(seed)
    pool = questions["questions"]
    if balance_answers:
        pool = _balanced_by_question_text(pool, answers, rng)
    order = rng.permutation(len(pool))
    cache: dict[int, str] = {}
    docs = []
    for start in range(0, len(order) - per_document + 1, per_document):
        if max_documents is not None and len(docs) >= max_documents:
            break
        picked = [pool[i] for i in order[start : start + per_document]]
        infos, texts = [], []
        for j, q in enumerate(picked):
            image_id = q["image_id"]
            if image_id not in cache:
                cache[image_id] = base64.b64encode(
                    (Path(image_dir) / IMAGE_FILENAME.format(image_id=image_id)).read_bytes()
                ).decode()
            texts.append(f"Question:{q['question']} Short answer:{answers[q['question_id']]}")
            infos.append({"image_name": f"{image_id}.png", "matched_text_index": j, "matched_sim": 0.3,
                          "image_base64": cache[image_id]})  # fmt: skip
        sim = [[0.3 if i == j else 0.1 for j in range(per_document)] for i in range(per_document)]
        docs.append({"key": f"easyvqa-{split}-{start // per_document:06d}",
                     "doc": {"text_list": texts, "image_info": infos, "similarity_matrix": sim}})  # fmt: skip
    return docs


def _balanced_by_question_text(questions: list[dict], answers: dict, rng) -> list[dict]:
    """Per question text, keep min-count questions of every answer it has (seeded choice, original order)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault((q["question"], answers[q["question_id"]]), []).append(i)
    per_text: dict[str, int] = {}
    for (text, _), members in groups.items():
        per_text[text] = min(per_text.get(text, len(members)), len(members))
    keep = []
    for (text, _), members in groups.items():
        keep.extend(rng.choice(members, per_text[text], replace=False).tolist())
    return [questions[i] for i in sorted(keep)]


def write_fewshot_training_mds(out_dir: str | Path, split: str = "train", **kwargs) -> int:
    """Write `fewshot_training_documents` as an MMC4 MDS dataset (data/mds_format.py columns); returns the count."""
    from streaming import MDSWriter

    from flamingo_composer.data.mds import MMC4_MDS_COLUMNS, mmc4_doc_to_mds

    docs = fewshot_training_documents(split, **kwargs)
    with MDSWriter(
        out=str(out_dir), columns=MMC4_MDS_COLUMNS, compression=None, size_limit=1 << 22
    ) as writer:
        for d in docs:
            writer.write(mmc4_doc_to_mds(d["doc"], d["key"]))
    return len(docs)


def vqa_pair_text(question: str, answer: str) -> str:
    """The filled VQA prompt without its `<image>` and `<|endofchunk|>`, which LAION preprocessing puts around a
    caption: so a pair trains exactly the evaluation's `<image>Question:{q} Short answer:{a}<|endofchunk|>`."""
    from flamingo_composer.eval.prompts import ENDOFCHUNK, MEDIA, vqa_prompt

    return vqa_prompt(question, answer).removeprefix(MEDIA).removesuffix(ENDOFCHUNK)


def write_vqa_pairs_mds(out_dir: str | Path, split: str = "train", first_word: str | None = "what") -> int:
    """LAION-style (image, "Question:{q} Short answer:{a}") pairs of the questions starting with `first_word`
    (None: all), as LAION MDS.

    Why "what" by default: only those answers (a colour or a shape) need the image alone; the yes/no questions
    (74% of easy-vqa) need question and image together, and a tiny model trained on all of them learned no image
    use in our runs (yamls/eval-easyvqa.yaml has the figures).
    """
    questions, annotations, _ = easy_vqa_layout(split)
    answers = {a["question_id"]: a["answers"][0]["answer"] for a in annotations["annotations"]}
    rows = [
        (f"easyvqa-{split}-q{q['question_id']}", q["image_id"], vqa_pair_text(q["question"], answers[q["question_id"]]))
        for q in questions["questions"]
        if first_word is None or q["question"].split(" ", 1)[0] == first_word
    ]
    return _write_laion_pairs(out_dir, split, rows)


def _write_laion_pairs(out_dir: str | Path, split: str, rows: list[tuple[str, int, str]]) -> int:
    """(key, image_id, text) rows as LAION MDS with the package's PNG bytes; returns the count."""
    from streaming import MDSWriter

    from flamingo_composer.data.mds import LAION_MDS_COLUMNS

    image_dir = Path(easy_vqa_layout(split)[2])
    with MDSWriter(
        out=str(out_dir), columns=LAION_MDS_COLUMNS, compression=None, size_limit=1 << 22
    ) as writer:
        for key, image_id, text in rows:
            png = (image_dir / IMAGE_FILENAME.format(image_id=image_id)).read_bytes()
            writer.write({"key": key, "jpg": png, "txt": text})
    return len(rows)
