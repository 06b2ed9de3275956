"""Classification by class-name ranking against the reference's own `evaluate_classification` (open_flamingo 2.0.1,
tools/reference_oracle.py): the same tiny model weights (the reference model built by its factory, its state loaded
into ours), the same ImageFolder / HatefulMemes files, the same seeds. Checked per batch: the prompts (token ids),
the per-class log-likelihoods (with and without the KV cache, with and without prompt ensembling), and the final
top-1 accuracy / ROC-AUC. Our cached and uncached paths also agree on left-padded batches.

The reference's cached path leaves its class tokens unmasked against the prompt's left padding, so the cached
comparisons use one query per batch (no padding); the uncached ones use padded batches of three.
"""

from __future__ import annotations

import dataclasses

import pytest
import reference_oracle as oracle
import torch
from eval_benchmark_data import hateful_memes, image_folder

from flamingo_composer.eval.classification import class_log_likelihoods
from flamingo_composer.eval.classification_task import classify_batch
from flamingo_composer.eval.config import EvalSplitConfig, EvaluatorConfig
from flamingo_composer.eval.tasks import build_task, score_records
from flamingo_composer.models.factory import TokenizerConfig
from flamingo_composer.models.tiny import tiny_model_config

EASY_VQA_VOCAB = 115  # the easy-vqa word-level tokenizer's size before the Flamingo tokens
# In the easy-vqa tokenizer's vocabulary (it has "yes" / "no"); multi-token names exercise the padding of chunks.
CLASS_NAMES = ["red circle", "blue", "green square", "yellow star on the left", "purple"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    cfg = tiny_model_config("gpt_neox")
    lm = dataclasses.replace(cfg.lm, config={**cfg.lm.config, "vocab_size": EASY_VQA_VOCAB})  # its own rows for yes/no
    cfg = dataclasses.replace(cfg, lm=lm, tokenizer=TokenizerConfig(builtin="easy_vqa"))
    pair = oracle.build_pair(cfg, root / "models", seed=0)
    imagenet = root / "imagenet"
    data = {
        "imagenet_train": image_folder(imagenet, "train", [2, 2, 2, 1], seed=1),
        "imagenet_val": image_folder(imagenet, "val", [1, 1, 1, 1], seed=2),
        "hm_train": hateful_memes(root / "hm", "train", [0, 1, 1, 0, 0, 1], seed=3),
        "hm_test": hateful_memes(root / "hm", "dev_seen", [1, 0, 0, 1, 1], seed=4),
    }
    names = root / "classnames.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    return {"pair": pair, "data": data, "imagenet_root": str(imagenet), "class_names": str(names)}


def ours(setup, benchmark: str, *, batch_size: int, ensembling: bool, use_cache: bool, shots: int = 2):
    """Our task and model on the same data: (score dict, [(input_ids per order, (B, C) log-likelihoods)])."""
    data, pair = setup["data"], setup["pair"]
    train, test = ("imagenet_train", "imagenet_val") if benchmark == "imagenet" else ("hm_train", "hm_test")
    cfg = EvaluatorConfig(
        name=benchmark, benchmark=benchmark, train=EvalSplitConfig(**data[train]), test=EvalSplitConfig(**data[test]),
        shots=[shots], batch_size=batch_size, query_set_size=6, prompt_ensembling=ensembling, kv_cache=use_cache,
        class_batch_rows=4, class_names=setup["class_names"] if benchmark == "imagenet" else None,
    )  # fmt: skip
    task = build_task(cfg, pair.ours.tokenizer, pair.ours.image_transform)
    model = pair.ours.model.eval()
    records, batches = [], []
    for trial, positions in task.rank_positions(0, 1):
        batch = task.make_batch(shots, trial, positions)
        summaries, logprobs = classify_batch(model, batch)
        batches.append(([p["input_ids"] for p in batch["prompts"]], logprobs))
        records += [(trial, i, s, r) for i, s, r in zip(batch["ids"], summaries, batch["references"])]
    return score_records("classification", records, 1, **task.scoring), batches


def assert_same_batches(setup, our_batches, reference_calls, permutations: int):
    tokenizer = setup["pair"].tokenizer
    assert len(reference_calls) == len(our_batches) * permutations
    for b, (our_ids, our_logprobs) in enumerate(our_batches):
        calls = reference_calls[b * permutations : (b + 1) * permutations]
        for ids, (texts, _) in zip(our_ids, calls):
            want = tokenizer(texts, padding="longest", return_tensors="pt", padding_side="left")["input_ids"]
            assert torch.equal(ids, want), texts
        want = torch.stack([lp for _, lp in calls], dim=-1).mean(dim=-1)  # the reference's ensemble mean
        scale = want.abs().max().item()
        torch.testing.assert_close(our_logprobs, want, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "batch_size, ensembling, use_cache",
    [(1, True, True), (3, False, False), (3, True, False)],
    ids=["cached-ensembled", "uncached-padded", "uncached-padded-ensembled"],  # ensembles drawn per batch of 3
)
def test_imagenet_scores_equal_the_reference(setup, batch_size, ensembling, use_cache):
    score, batches = ours(setup, "imagenet", batch_size=batch_size, ensembling=ensembling, use_cache=use_cache)
    ref_score, eval_model = oracle.reference_classification(
        setup["pair"], "imagenet", shots=2, seed=42, batch_size=batch_size, query_set_size=6, use_cache=use_cache,
        ensembling=ensembling, imagenet_root=setup["imagenet_root"], imagenet_classnames=CLASS_NAMES,
    )  # fmt: skip
    assert_same_batches(setup, batches, eval_model.calls, permutations=2 if ensembling else 1)
    assert score["trials"][0] == pytest.approx(100 * ref_score)  # the reference reports a fraction
    assert 0 <= score["top5"] <= 100 and score["top5"] >= score["trials"][0]


def test_hateful_memes_roc_auc_equals_the_reference(setup):
    data = setup["data"]
    score, batches = ours(setup, "hateful_memes", batch_size=1, ensembling=False, use_cache=True)
    paths = {"images": data["hm_train"]["images"], "train": data["hm_train"]["annotations"],
             "test": data["hm_test"]["annotations"]}  # fmt: skip
    ref_auc, eval_model = oracle.reference_classification(
        setup["pair"], "hateful_memes", shots=2, seed=42, batch_size=1, query_set_size=6, use_cache=True,
        ensembling=False, hateful_memes=paths,
    )  # fmt: skip
    assert_same_batches(setup, batches, eval_model.calls, permutations=1)
    assert score["trials"][0] == pytest.approx(100 * ref_auc, abs=1e-9)  # sklearn's roc_auc_score, x 100


def test_cached_equals_uncached_on_padded_batches(setup):
    """Three prompts of 1, 2 and 4 demos (left-padded to the longest), five class names of 1-5 tokens, chunks of 4
    and 64 rows: reusing the prompt's cache gives the full forward's numbers."""
    from flamingo_composer.eval.generation import stack_images, tokenize_prompts

    pair = setup["pair"]
    task = build_task(EvaluatorConfig(
        name="in", benchmark="imagenet", train=EvalSplitConfig(**setup["data"]["imagenet_train"]),
        test=EvalSplitConfig(**setup["data"]["imagenet_val"]), shots=[4], class_names=setup["class_names"],
    ), pair.ours.tokenizer, pair.ours.image_transform)  # fmt: skip
    prompts = [task.prompt(query, demos, len(demos)) for query, demos in ((0, [6]), (1, [0, 2]), (2, [1, 3, 4, 5]))]
    images, image_mask = stack_images([[task._image(p) for p in paths] for _, paths in prompts])
    assert images.shape[0] == 2 + 3 + 5 and image_mask.sum(1).tolist() == [2, 3, 5]  # demos + query each
    inputs = {
        "images": images,
        "image_mask": image_mask,
        **tokenize_prompts(pair.ours.tokenizer, [t for t, _ in prompts]),
    }
    assert (inputs["attention_mask"] == 0).any(dim=1).tolist() == [True, True, False]  # left padding
    model = pair.ours.model.eval()
    cached4, cached64, uncached = [
        class_log_likelihoods(model, **inputs, class_tokens=task.class_tokens, use_cache=c, rows=r)
        for c, r in ((True, 4), (True, 64), (False, 5))
    ]
    assert {len(t) for t in task.class_tokens} == {1, 2, 5}
    torch.testing.assert_close(cached4, uncached, rtol=0, atol=1e-5 * uncached.abs().max().item())
    torch.testing.assert_close(cached64, uncached, rtol=0, atol=1e-5 * uncached.abs().max().item())


def test_a_training_evaluator_scores_classification_through_the_composer_model(setup):
    """The `evaluators:` path of a training run: the Evaluator's batches through FewShotComposerModel.eval_forward
    and its ROC_AUC metric give the standalone task's score."""
    from flamingo_composer.eval.composer_eval import FewShotComposerModel, build_fewshot_evaluators

    pair, data = setup["pair"], setup["data"]
    cfg = EvaluatorConfig(name="hm", benchmark="hateful_memes", train=EvalSplitConfig(**data["hm_train"]),
                          test=EvalSplitConfig(**data["hm_test"]), shots=[2], batch_size=2,
                          query_set_size=6)  # fmt: skip
    [evaluator] = build_fewshot_evaluators([cfg], pair.ours.tokenizer, pair.ours.image_transform)
    assert evaluator.label == "eval/hm_2shot" and evaluator.metric_names == ["^ROC_AUC"]
    composer_model = FewShotComposerModel(pair.ours.model.eval(), pair.ours.tokenizer)
    metric = composer_model.get_metrics(is_train=False)["ROC_AUC"]
    for batch in evaluator.dataloader.dataloader:
        composer_model.update_metric(batch, composer_model.eval_forward(batch), metric)
    want, _ = ours(setup, "hateful_memes", batch_size=2, ensembling=False, use_cache=True)
    assert metric.compute().item() == pytest.approx(want["mean"])
