"""The suite command (flamingo-evaluate --suite): three benchmarks (Flickr30K captioning, VizWiz VQA in its own
layout, HatefulMemes classification) at 0 and 4 shots on tiny hand-made data with the fixture's released
checkpoint.pt run to a JSON and a Markdown table; stopped in the middle and started again it runs only what is
missing; a finished suite builds no model; a missing file stops it before any model is loaded. The shipped
yamls/eval/openflamingo.yaml reads with its documented layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_benchmark_data import flickr, hateful_memes, image_folder, tiny_nltk_fixture, vizwiz  # noqa: F401
from omegaconf import OmegaConf

from flamingo_composer.cli import evaluate

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "openflamingo-tiny-gptneox"

FIXTURE_MODEL = {"vision": {"config_path": str(FIXTURE / "vision" / "of-tiny-vit-small.json")},
                 "lm": {"name": str(FIXTURE / "lm")}, "tokenizer": {"name": str(FIXTURE / "lm")},
                 "cross_attn_every_n_layers": 2, "seed": 0}  # fmt: skip


def write_suite(root: Path, *, hm_annotations: str | None = None, class_names: str | None = None) -> Path:
    data = root / "data"
    hm_train = hateful_memes(data / "hm", "train", [0, 1, 0, 1, 1, 0], seed=1)
    hm_test = hateful_memes(data / "hm", "dev_seen", [1, 0, 1], seed=2)
    viz_train, viz_test = vizwiz(data / "vizwiz", "train", 6, seed=3), vizwiz(data / "vizwiz", "val", 3, seed=4)
    fl = flickr(data / "flickr")
    common = {"shots": [0, 4], "num_samples": 3, "batch_size": 2, "query_set_size": 6, "greedy": True,
              "max_new_tokens": 2}  # fmt: skip
    hm = {"name": "hateful_memes", "benchmark": "hateful_memes", "train": hm_train,
          "test": {**hm_test, **({"annotations": hm_annotations} if hm_annotations else {})},
          **common, "num_trials": 2, "trial_seeds": [42, 7]}  # fmt: skip
    evaluators = [
        {"name": "flickr30k", "benchmark": "flickr30k", "train": fl, "test": fl, **common},
        {"name": "vizwiz", "benchmark": "vizwiz", "train": viz_train, "test": viz_test, **common},
        hm,
    ]
    if class_names is not None:
        split = image_folder(data / "imagenet", "train", [1, 1], seed=5)
        evaluators.append({"name": "imagenet", "benchmark": "imagenet", "train": split, "test": split,
                           "class_names": class_names, **common})  # fmt: skip
    suite = {
        "model": FIXTURE_MODEL,
        "suite": {"results": str(root / "out" / "suite.json"), "predictions": str(root / "out" / "predictions")},
        "evaluators": evaluators,
    }  # fmt: skip
    path = root / "suite.yaml"
    OmegaConf.save(OmegaConf.create(suite), path)
    return path


def run(suite: Path, checkpoint: Path = FIXTURE / "checkpoint.pt") -> int:
    return evaluate.main(["--suite", str(suite), "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"])


def test_suite_runs_to_a_table_and_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    from flamingo_composer.eval import runner

    suite = write_suite(tmp_path)
    results_path, table_path = tmp_path / "out" / "suite.json", tmp_path / "out" / "suite.md"
    real_predict, calls = runner.predict, []

    def predict(*args, **kwargs):
        calls.append((args[1].cfg.name, args[2], tuple(kwargs["trials"])))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt  # killed while the 4th unit runs
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(runner, "predict", predict)
    stop_after = 3
    with pytest.raises(KeyboardInterrupt):
        run(suite)
    first = json.loads(results_path.read_text())["units"]
    assert sorted(first) == ["flickr30k/0shot/trial0", "flickr30k/4shot/trial0", "vizwiz/0shot/trial0"]
    assert "| Flickr-30K (CIDEr) |" in table_path.read_text() and "| - |" in table_path.read_text()

    calls.clear()
    stop_after = None
    assert run(suite) == 0
    assert calls == [("vizwiz", 4, (0,)), ("hateful_memes", 0, (0,)), ("hateful_memes", 0, (1,)),
                     ("hateful_memes", 4, (0,)), ("hateful_memes", 4, (1,))]  # fmt: skip
    results = json.loads(results_path.read_text())
    assert {k: results["units"][k] for k in first} == first  # kept, not run again
    assert len(results["units"]) == 8 and results["loaded"]["format"] == "openflamingo"
    hm = results["summary"]["hateful_memes"]["shots"]["4"]
    assert len(hm["trials"]) == 2 and hm["complete"] and results["summary"]["vizwiz"]["metric"] == "VQAAccuracy"
    table = table_path.read_text().splitlines()
    assert table[0] == "| Benchmark | 0-shot | 4-shot |"
    assert [row.split(" |")[0] for row in table[2:]] == ["| Flickr-30K (CIDEr)", "| VizWiz (Accuracy)",
                                                         "| Hateful Memes (ROC AUC)"]  # fmt: skip
    assert all(cell.count("±") == 1 for row in table[2:] for cell in row.strip("|").split("|")[1:])
    printed = json.loads(capsys.readouterr().out)
    assert printed["table"] == str(table_path)
    predictions = json.loads(Path(results["units"]["hateful_memes/4shot/trial1"]["predictions"][0]).read_text())
    assert {"id", "gt_label", "pred_label", "pred_score"} <= set(predictions[0]) and len(predictions) == 3

    # finished: nothing to run, no model built; another checkpoint's results are refused
    monkeypatch.setattr("flamingo_composer.models.factory.build_flamingo", _no_model)
    assert run(suite) == 0
    other = tmp_path / "other.pt"
    other.write_bytes((FIXTURE / "checkpoint.pt").read_bytes())
    assert run(suite, other) == 2
    assert "holds results of checkpoint" in capsys.readouterr().err


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built")


@pytest.mark.parametrize("problem", ["annotations", "class_names"])
def test_a_missing_file_stops_the_suite_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, problem):
    missing = str(tmp_path / "nowhere" / ("dev_seen.jsonl" if problem == "annotations" else "classnames.txt"))
    suite = write_suite(tmp_path, **{"hm_annotations" if problem == "annotations" else "class_names": missing})
    monkeypatch.setattr("flamingo_composer.models.factory.build_flamingo", _no_model)
    assert run(suite) == 2
    err = capsys.readouterr().err
    assert "config error" in err and missing in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_suite_file_reads_with_its_documented_layout(tmp_path, tiny_nltk):
    from flamingo_composer.eval.benchmarks import BENCHMARKS
    from flamingo_composer.eval.suite import read_suite

    raw = OmegaConf.load(REPO_ROOT / "yamls" / "eval" / "openflamingo.yaml")
    OmegaConf.update(raw, "variables.eval_root", str(tmp_path))
    for entry in OmegaConf.to_container(raw, resolve=True)["evaluators"]:
        for split in (entry["train"], entry["test"]):
            for key in ("annotations", "questions"):
                if key in split:
                    Path(split[key]).parent.mkdir(parents=True, exist_ok=True)
                    Path(split[key]).touch()
            Path(split["images"], "class0" if split["format"] == "imagefolder" else "").mkdir(
                parents=True, exist_ok=True
            )
    model, evaluators, suite = read_suite(REPO_ROOT / "yamls" / "eval" / "openflamingo.yaml",
                                          [f"variables.eval_root={tmp_path}"])  # fmt: skip
    assert [e.benchmark for e in evaluators] == list(BENCHMARKS)
    assert all(e.shots == [0, 4, 8, 16, 32] and e.num_trials == 3 for e in evaluators)
    assert model.lm.name == "anas-awadalla/mpt-1b-redpajama-200b" and suite.table.endswith("suite.md")
    with pytest.raises(ValueError, match=r"file not found: .*dataset_coco\.json"):
        read_suite(REPO_ROOT / "yamls" / "eval" / "openflamingo.yaml", [f"variables.eval_root={tmp_path}/elsewhere"])


def test_bench_eval_prints_the_speed_of_each_path(tmp_path, capsys):
    """benchmarks/bench_eval.py on the fixture's tiny model: every figure printed, cached and uncached scores agree."""
    from benchmarks import bench_eval as bench
    recipe = tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.create({"model": FIXTURE_MODEL}), recipe)
    assert bench.main(["--config", str(recipe), "--batch-size", "2",
                       "--shots", "2", "--batches", "1", "--classes", "12", "--rows", "8", "--caption-tokens", "2",
                       "--vqa-tokens", "1",
                       "--cached-queries", "2", "--uncached-queries", "1"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    for task in ("captioning", "vqa", "classification_cached", "classification_uncached"):
        assert result[f"{task}_queries_per_s"] > 0
    assert result["cached_equals_uncached_max_abs_diff"] < 1e-4
    memory = result["memory_per_query_batch_3b_bf16_bytes"]
    assert memory["total"] == memory["prompt_cache"] + memory["expanded_cache"] + memory["class_logits"]
