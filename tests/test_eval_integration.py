"""Few-shot evaluation end to end: a YAML evaluator inside `composer train.py` logs its metric; flamingo-evaluate
loads that run's checkpoint and gives the same score and predictions on 1 and 2 ranks (`composer -n 2`, gloo);
flamingo-generate runs a released-format OpenFlamingo checkpoint.pt; a missing annotation file stops the run
before training, naming the path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO_ROOT, rank_launcher, subprocess_env

pytest.importorskip("easy_vqa")

COMPOSER = str(Path(sys.executable).parent / "composer")
RECIPE = REPO_ROOT / "yamls" / "eval-easyvqa.yaml"
STEPS = 6


def _env() -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONPATH"] = str(REPO_ROOT)  # the tools import this checkout's package
    return env


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def easy_vqa_run(tmp_path_factory):
    """A 6-step run of yamls/eval-easyvqa.yaml (120 easy-vqa training documents + the "what" pairs), its
    evaluators at the end."""
    from flamingo_composer.eval.easy_vqa import write_fewshot_training_mds, write_vqa_pairs_mds

    root = tmp_path_factory.mktemp("easyvqa")
    write_fewshot_training_mds(root / "mds" / "train", max_documents=120)
    write_vqa_pairs_mds(root / "mds" / "what_pairs")
    out = root / "run"
    _run([
        COMPOSER, "-n", "1", "train.py", str(RECIPE), f"variables.data_root={root}",
        "variables.eval_samples=24", "variables.eval_shots=[0,4]", f"max_duration={STEPS}",
        f"eval_interval={STEPS}", "run_name=evaltest", f"save_folder={out}/checkpoints", f"save_interval={STEPS}",
        "autoresume=false", "data.mmc4.num_workers=0", "data.laion.num_workers=0",
        f"loggers.file.filename={out}/logs-rank{{rank}}.txt",
        "loggers.file.flush_interval=1", "callbacks={}",
    ], timeout=400)  # fmt: skip
    return root, out


@pytest.mark.slow
def test_yaml_evaluator_runs_inside_composer_train_and_logs_its_metric(easy_vqa_run):
    _, out = easy_vqa_run
    log = (out / "logs-rank0.txt").read_text()
    for shot in (0, 4):
        for name in ("VQAAccuracy", "VQAAccuracy_std"):
            key = f"metrics/eval/easyvqa_{shot}shot/{name}"
            assert key in log, key
    line = next(ln for ln in log.splitlines() if "metrics/eval/easyvqa_4shot/VQAAccuracy:" in ln)
    value = float(line.rsplit(":", 1)[1])
    assert 0.0 <= value <= 100.0
    print(line.strip())


def _evaluate(world_size: int, checkpoint: Path, out: Path) -> dict:
    launcher = [COMPOSER, "-n", str(world_size)] if world_size > 1 else [sys.executable]  # as a user runs it
    cmd = [
        *launcher,
        "tools/evaluate.py",  # the old path, now a shim, as `composer -n N` runs it
        "--config",
        str(RECIPE),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--shots",
        "0",
        "4",
        "--num-samples",
        "40",
        "--batch-size",
        "8",
        "variables.data_root=/nonexistent",
    ]  # fmt: skip  (evaluation needs no training data)
    proc = _run(cmd)
    printed, _ = json.JSONDecoder().raw_decode(
        proc.stdout[proc.stdout.index("{") :]
    )  # the launcher may add lines
    saved = json.loads((out / "summary.json").read_text())
    assert printed == saved
    return saved


@pytest.mark.slow
def test_evaluate_tool_gives_the_same_score_on_one_and_two_ranks(easy_vqa_run, tmp_path):
    _, out = easy_vqa_run
    checkpoint = out / "checkpoints" / "latest-rank0.pt"
    one = _evaluate(1, checkpoint, tmp_path / "one")
    two = _evaluate(2, checkpoint, tmp_path / "two")
    assert one["checkpoint"]["format"] == "composer" and two["world_size"] == 2
    for shot in ("0", "4"):
        a, b = one["tasks"]["easyvqa"]["shots"][shot], two["tasks"]["easyvqa"]["shots"][shot]
        assert a["trials"] == b["trials"] and a["mean"] == b["mean"] and a["num_queries"] == 40
        preds_one = json.loads(Path(a["predictions"][0]).read_text())
        preds_two = json.loads(Path(b["predictions"][0]).read_text())
        assert sorted(preds_one, key=lambda r: r["question_id"]) == sorted(
            preds_two, key=lambda r: r["question_id"]
        )
        assert set(preds_one[0]) == {"question_id", "answer"}  # the VQA results format
    print(f"4-shot VQA accuracy, 1 rank {one['tasks']['easyvqa']['shots']['4']['mean']:.2f}, "
          f"2 ranks {two['tasks']['easyvqa']['shots']['4']['mean']:.2f}; "
          f"eval samples/s (1 rank, CPU) {one['eval_samples_per_s_per_rank']:.1f}")  # fmt: skip


def _fixture_recipe(tmp_path: Path) -> Path:
    fixture = REPO_ROOT / "tests" / "fixtures" / "openflamingo-tiny-gptneox"
    recipe = tmp_path / "fixture.yaml"
    recipe.write_text(
        "model:\n"
        f"  vision: {{config_path: {fixture}/vision/of-tiny-vit-small.json}}\n"
        f"  lm: {{name: {fixture}/lm}}\n"
        f"  tokenizer: {{name: {fixture}/lm}}\n"
        "  cross_attn_every_n_layers: 2\n"
        "  seed: 0\n"
    )
    return recipe


def test_released_checkpoint_loads_for_the_tools(tmp_path):
    import torch

    from flamingo_composer.eval.checkpoints import load_checkpoint, read_recipe
    from flamingo_composer.models.factory import build_flamingo

    checkpoint = REPO_ROOT / "tests" / "fixtures" / "openflamingo-tiny-gptneox" / "checkpoint.pt"
    model_cfg, evaluators = read_recipe(_fixture_recipe(tmp_path))
    assert evaluators == []
    bundle = build_flamingo(model_cfg)
    summary = load_checkpoint(bundle.model, checkpoint)
    assert summary["format"] == "openflamingo"
    released = torch.load(checkpoint, weights_only=True)
    gate_keys = [k for k in released if k.endswith("attn_gate")]
    assert gate_keys
    state = bundle.model.state_dict()
    for key in gate_keys:
        assert torch.equal(state[key], released[key])


@pytest.mark.slow
def test_generate_tool_prints_text_for_an_image_and_a_prompt(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 120, 200)).save(tmp_path / "a.png")
    checkpoint = REPO_ROOT / "tests" / "fixtures" / "openflamingo-tiny-gptneox" / "checkpoint.pt"
    base = [sys.executable, "tools/generate.py", "--config", str(_fixture_recipe(tmp_path)), "--checkpoint",
            str(checkpoint), "--image", str(tmp_path / "a.png")]  # fmt: skip
    proc = _run([*base, "--prompt", "<image>Output:", "--max-new-tokens", "5"])
    assert proc.stdout.strip()  # the fixture LM is random: some text, whatever it says
    bad = subprocess.run([*base, "--prompt", "no image token"], cwd=REPO_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "1 --image" in bad.stderr


def test_missing_annotation_file_stops_the_run_before_training(easy_vqa_data_root_for_config, tmp_path):
    from omegaconf import OmegaConf

    from flamingo_composer.training.config import ConfigError, load_config

    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text('{"questions": []}')
    missing = tmp_path / "v2_mscoco_val2014_annotations.json"
    cfg = OmegaConf.load(RECIPE)
    cfg.evaluators.append({
        "name": "vqav2", "kind": "vqa", "train": {"format": "easy_vqa"},
        "test": {"format": "vqav2", "questions": str(questions), "annotations": str(missing), "images": str(tmp_path)},
    })  # fmt: skip
    recipe = tmp_path / "r.yaml"
    OmegaConf.save(cfg, recipe)
    with pytest.raises(ConfigError) as info:
        load_config(recipe, [f"variables.data_root={easy_vqa_data_root_for_config}"])
    assert "evaluators[1].test.annotations: file not found" in str(info.value) and str(missing) in str(
        info.value
    )


@pytest.fixture
def easy_vqa_data_root_for_config(tmp_path):
    """A data root whose MDS index exists (config validation checks it); no data needed to fail on evaluators."""
    for split in ("train", "what_pairs"):
        (tmp_path / "data" / "mds" / split).mkdir(parents=True)
        (tmp_path / "data" / "mds" / split / "index.json").write_text("{}")
    return tmp_path / "data"


def _composer_path_scores(world_size: int, out: Path) -> list[dict]:
    out.mkdir()
    _run([*rank_launcher(world_size), "tests/eval_ddp_script.py", str(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.slow
def test_composer_evaluator_path_scores_the_same_on_every_rank_and_world_size(tmp_path):
    (one,) = _composer_path_scores(1, tmp_path / "one")
    two = _composer_path_scores(2, tmp_path / "two")
    assert two[0]["values"] == two[1]["values"] == one["values"]  # identical on every rank, as on one rank
    assert two[0]["trials"] == one["trials"] and len(one["trials"]) == 2
    assert two[0]["records_this_rank"] + two[1]["records_this_rank"] == one["records_this_rank"] == 40
    assert sorted(two[0]["predictions"] + two[1]["predictions"]) == sorted(one["predictions"])  # same text
    print(f"Composer path, 2 trials: VQA accuracy {one['values']}")
