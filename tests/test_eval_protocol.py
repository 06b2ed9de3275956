"""The few-shot protocol matches the reference's evaluation (open_flamingo/eval, v2.0.1): prompt strings,
post-processing, the draws of eval samples / query set / demos, plus the data readers and their bad-input
handling, the easy-vqa adapter, and the generation path (KV cache, images encoded once)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flamingo_composer.eval import prompts
from flamingo_composer.eval.datasets import load_coco_captions, load_karpathy, load_vqav2
from flamingo_composer.eval.postprocess import postprocess_caption, postprocess_vqa
from flamingo_composer.eval.protocol import plan_trial, rank_batches

# ---------------------------------------------------------------------------------------------------- prompts
# The reference's EvalModel (open_flamingo/eval/models/open_flamingo.py, not shipped in the 2.0.1 wheel):
#   get_vqa_prompt:     f"<image>Question:{question} Short answer:{answer if answer is not None else ''}"
#                       f"{'<|endofchunk|>' if answer is not None else ''}"
#   get_caption_prompt: f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if ...}"
# evaluate.py joins demos as "".join(prompt + "\n" ...), removes "<image>" from them for 0-shot, appends the query.


def test_caption_prompts_are_the_reference_strings():
    demos = [prompts.caption_prompt(c) for c in ("A cat on a mat.", "Two dogs.")]
    query = prompts.caption_prompt()
    assert query == "<image>Output:"
    assert prompts.few_shot_prompt(demos, query, 2) == (
        "<image>Output:A cat on a mat.<|endofchunk|>\n<image>Output:Two dogs.<|endofchunk|>\n<image>Output:"
    )
    assert prompts.few_shot_prompt(demos, query, 0) == (
        "Output:A cat on a mat.<|endofchunk|>\nOutput:Two dogs.<|endofchunk|>\n<image>Output:"
    )


def test_vqa_prompts_are_the_reference_strings():
    demos = [prompts.vqa_prompt("what color is it?", "red"), prompts.vqa_prompt("is it round?", "yes")]
    query = prompts.vqa_prompt("how many?")
    assert query == "<image>Question:how many? Short answer:"
    assert prompts.few_shot_prompt(demos, query, 2) == (
        "<image>Question:what color is it? Short answer:red<|endofchunk|>\n"
        "<image>Question:is it round? Short answer:yes<|endofchunk|>\n"
        "<image>Question:how many? Short answer:"
    )
    assert prompts.few_shot_prompt(demos, query, 0) == (
        "Question:what color is it? Short answer:red<|endofchunk|>\n"
        "Question:is it round? Short answer:yes<|endofchunk|>\n"
        "<image>Question:how many? Short answer:"
    )
    assert prompts.images_for_prompt(["d1", "d2"], "q", 2) == ["d1", "d2", "q"]
    assert prompts.images_for_prompt(["d1", "d2"], "q", 0) == ["q"]  # 0-shot: text-only demos


def test_effective_shots_match_the_reference():
    from open_flamingo.eval.utils import compute_effective_num_shots

    for shots in (0, 1, 4, 8, 16, 32):
        assert prompts.effective_num_shots(shots) == compute_effective_num_shots(shots, "open_flamingo")


GENERATIONS = [
    "a cat on a mat",
    'a "big" dog Output:a cat',
    "two dogsOutput",
    "red Question:what",
    "yes, it is",
    "blue Short answer:red",
    "no Answer: yes, no",
    "green, blue, red",
    "",
]


def test_postprocessing_matches_the_reference():
    from open_flamingo.eval.coco_metric import postprocess_captioning_generation
    from open_flamingo.eval.vqa_metric import postprocess_vqa_generation

    for text in GENERATIONS:
        assert postprocess_vqa(text) == postprocess_vqa_generation(text), text
        # evaluate.py: postprocess_captioning_generation(out).replace('"', "")
        assert postprocess_caption(text) == postprocess_captioning_generation(text).replace('"', ""), text
    assert postprocess_vqa("yes, it is") == "yes"
    assert postprocess_caption('a "big" dog Output:a cat') == "a big dog "


# --------------------------------------------------------------------------------------------------- sampling


def _reference_plan(num_test, num_train, num_samples, query_set_size, shots, seed, batch_size):
    """The reference's draws, by its own utils functions (one rank, a 1-process gloo group for its sampler)."""
    from open_flamingo.eval import utils
    from reference_oracle import single_process_group  # reuses a group a test left

    with single_process_group():
        test = [{"index": i} for i in range(num_test)]  # its collate wants dicts
        train = list(range(num_train))
        np.random.seed(seed)
        loader = utils.prepare_eval_samples(test, num_samples, batch_size)
        query_set = utils.get_query_set(train, query_set_size)
        utils.random_seed(seed, 0)
        queries, demos = [], []
        for batch in loader:
            batch = [int(x) for x in batch["index"]]
            queries += batch
            k = utils.compute_effective_num_shots(shots, "open_flamingo")
            demos += [
                [int(d) for d in row]
                for row in utils.sample_batch_demos_from_query_set(query_set, k, len(batch))
            ]
        return queries, demos


@pytest.mark.parametrize("shots, seed", [(4, 42), (0, 7), (8, 123)])
def test_trial_plan_reproduces_the_reference_draws(shots, seed):
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        queries, demos = _reference_plan(200, 300, 50, 64, shots, seed, batch_size=8)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    plan = plan_trial(200, 300, num_shots=shots, seed=seed, num_samples=50, query_set_size=64)
    assert plan.queries == queries
    assert plan.demos == demos


def test_rank_batches_partition_the_queries_with_the_same_batches():
    one = rank_batches(23, 4, 0, 1)
    two = rank_batches(23, 4, 0, 2) + rank_batches(23, 4, 1, 2)
    assert sorted(two, key=lambda r: r.start) == one  # same batches, dealt to ranks
    assert [list(r) for r in rank_batches(23, 4, 1, 2)] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22]]


# --------------------------------------------------------------------------------------------------- datasets


def _image(path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_karpathy_reader_keeps_the_split_and_counts_bad_records(tmp_path):
    (tmp_path / "val2014").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _image(tmp_path / "val2014" / name)
    entry = lambda name, split, cid: {  # noqa: E731
        "filepath": "val2014", "filename": name, "split": split, "cocoid": cid,
        "sentences": [{"raw": f"caption one of {cid}"}, {"raw": f"caption two of {cid}"}],
    }  # fmt: skip
    images = [
        entry("a.jpg", "test", 1),
        entry("b.jpg", "train", 2),
        entry("missing.jpg", "test", 3),  # image absent -> skipped
        {"filename": "c.jpg", "split": "test", "cocoid": 4},  # no sentences -> malformed
        entry("c.jpg", "test", 5),
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    examples, skips = load_karpathy(str(path), str(tmp_path), "test")
    assert [e.id for e in examples] == [1, 5]
    assert examples[0].caption == "caption one of 1" and len(examples[0].references) == 2
    assert skips.counts == {"missing_image": 1, "malformed_record": 1}
    assert any("images[2]" in n and "missing.jpg" in n for n in skips.named)
    assert any("images[3]" in n and "'sentences'" in n for n in skips.named)


def test_coco_captions_reader(tmp_path):
    _image(tmp_path / "x.jpg")
    data = {
        "images": [{"id": 7, "file_name": "x.jpg"}, {"id": 8, "file_name": "y.jpg"}],
        "annotations": [{"image_id": 7, "caption": "first"}, {"image_id": 7, "caption": "second"},
                        {"image_id": 8, "caption": "lost"}, {"image_id": 7}],
    }  # fmt: skip
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    examples, skips = load_coco_captions(str(path), str(tmp_path))
    assert [(e.id, e.caption, e.references) for e in examples] == [(7, "first", ("first", "second"))]
    assert skips.counts == {"malformed_record": 1, "missing_image": 1}


def test_vqav2_reader_pairs_by_question_id_and_names_bad_records(tmp_path):
    folder = tmp_path / "val2014"
    folder.mkdir()
    _image(folder / "COCO_val2014_000000000001.jpg")
    questions = {"questions": [
        {"question_id": 10, "image_id": 1, "question": "what color?"},
        {"question_id": 11, "image_id": 2, "question": "image missing?"},
        {"question_id": 12, "image_id": 1},
        {"question_id": 13, "image_id": 1, "question": "no annotation?"},
    ]}  # fmt: skip
    annotations = {"annotations": [
        {"question_id": 11, "answers": [{"answer": "x"}]},
        {"question_id": 10, "answers": [{"answer": "red"}, {"answer": "dark red"}]},
        {"question_id": 13, "answers": "oops"},
    ]}  # fmt: skip
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    examples, skips = load_vqav2(str(q), str(a), str(folder))
    assert [(e.id, e.question, e.answers) for e in examples] == [(10, "what color?", ("red", "dark red"))]
    assert skips.counts == {"missing_image": 1, "malformed_record": 2, "no_annotation": 1}
    assert any(f"{a}: annotations[2]" in n for n in skips.named)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_vqav2(str(tmp_path / "nope.json"), str(a), str(folder))


def test_easy_vqa_in_the_vqav2_layout(tmp_path):
    pytest.importorskip("easy_vqa")
    from flamingo_composer.eval.easy_vqa import IMAGE_FILENAME, write_easy_vqa_vqav2
    from flamingo_composer.models.factory import TokenizerConfig, build_tokenizer

    paths = write_easy_vqa_vqav2(tmp_path)
    train, train_skips = load_vqav2(**_vqav2_args(paths["train"]), image_filename=IMAGE_FILENAME)
    test, test_skips = load_vqav2(**_vqav2_args(paths["test"]), image_filename=IMAGE_FILENAME)
    assert (len(train), len(test)) == (38575, 9673) and train_skips.total == test_skips.total == 0
    assert len({a for e in train for a in e.answers}) == 13
    assert all(len(e.answers) == 10 and len(set(e.answers)) == 1 for e in test[:100])
    majority = sum(e.answers[0] == "yes" for e in test) / len(test)
    assert 0.35 < majority < 0.39  # "yes", about 37%
    tokenizer = build_tokenizer(TokenizerConfig(builtin="easy_vqa"))
    words = {
        w
        for e in train + test
        for w in tokenizer.tokenize(f"Question:{e.question} Short answer:{e.answers[0]}")
    }
    assert tokenizer.unk_token not in words


def test_easy_vqa_what_pairs_train_the_evaluation_prompt(tmp_path):
    """The LAION-style training pairs read back (MDS -> LAION processor) as the filled VQA prompt's tokens."""
    pytest.importorskip("easy_vqa")
    from streaming import LocalDataset

    from flamingo_composer.data.laion import LaionPreprocessConfig, LaionProcessor
    from flamingo_composer.eval.easy_vqa import IMAGE_FILENAME, easy_vqa_layout, write_vqa_pairs_mds
    from flamingo_composer.models.factory import TokenizerConfig, build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    count = write_vqa_pairs_mds(tmp_path / "pairs", split="test")
    questions, annotations, image_dir = easy_vqa_layout("test")
    what = [
        (q, a) for q, a in zip(questions["questions"], annotations["annotations"]) if q["question"].startswith("what")
    ]
    assert count == len(what) == 2537  # easy-vqa's test split: 26% "what" questions
    bundle = build_flamingo(tiny_model_config(vision="tiny-vit-64", tokenizer=TokenizerConfig(builtin="easy_vqa")))
    processor = LaionProcessor(bundle.tokenizer, bundle.image_transform, LaionPreprocessConfig(), seed=0)
    dataset = LocalDataset(str(tmp_path / "pairs"))
    for i in (0, 1, count - 1):
        q, a = what[i]
        row = processor(dataset[i], epoch=0, key=i)
        ids = row["input_ids"][row["attention_mask"].bool()].tolist()
        prompt = prompts.vqa_prompt(q["question"], a["multiple_choice_answer"]) + bundle.tokenizer.eos_token
        assert ids == bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert row["images"].shape[0] == 1
        own_image = Path(image_dir) / IMAGE_FILENAME.format(image_id=q["image_id"])
        assert dataset[i]["jpg"] == own_image.read_bytes()  # the pair holds its question's image


def _vqav2_args(split_paths):
    return {"questions_path": split_paths["questions"], "annotations_path": split_paths["annotations"],
            "image_dir": split_paths["images"]}  # fmt: skip


# ------------------------------------------------------------------------------------------------- generation


def test_generation_encodes_images_once_and_uses_the_kv_cache():
    pytest.importorskip("easy_vqa")
    from flamingo_composer.eval.config import EvalSplitConfig, EvaluatorConfig
    from flamingo_composer.eval.generation import MODEL_INPUTS, generate_text
    from flamingo_composer.eval.tasks import FewShotTask
    from flamingo_composer.models.factory import TokenizerConfig, build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    bundle = build_flamingo(
        tiny_model_config(vision="tiny-vit-64", tokenizer=TokenizerConfig(builtin="easy_vqa"))
    )
    split = EvalSplitConfig(format="easy_vqa")
    cfg = EvaluatorConfig(
        name="ev", kind="vqa", train=split, test=split, shots=[2], num_samples=4, batch_size=4
    )
    task = FewShotTask(cfg, bundle.tokenizer, bundle.image_transform)
    batch = task.make_batch(2, 0, range(4))
    assert batch["images"].shape[0] == 4 * 3 and batch["image_mask"].shape == (4, 3) and bool(batch["image_mask"].all())
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # left padding: every prompt ends at the right

    model = bundle.model
    vision_calls, step_lengths = [], []
    hook_v = model.vision_encoder.register_forward_hook(lambda m, i, o: vision_calls.append(i[0].shape[0]))
    hook_l = model.lang_encoder.register_forward_pre_hook(
        lambda m, a, kw: step_lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    try:
        texts = generate_text(model, bundle.tokenizer, **inputs, settings=task.settings)  # 3 beams
    finally:
        hook_v.remove()
        hook_l.remove()
    assert len(texts) == 4
    assert vision_calls == [
        4 * 3
    ]  # one vision pass over the 12 images (4 queries x 3), none per beam or step
    assert step_lengths[0] == batch["input_ids"].shape[1] and set(step_lengths[1:]) == {1}  # cached steps
