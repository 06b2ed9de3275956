"""Live parity with the reference package (open-flamingo 2.0.1, tests/reference_oracle.py) for three LM families.

For GPT-NeoX, LLaMA and MPT (transformers' MptForCausalLM, tied head), seeds 0 and 1, cross-attention every 1 and 2
layers: the reference is built by its own `create_model_and_transforms` from tiny offline files, our model from the
same files with the reference's state loaded, and the batch by the reference's own preprocessing. Checked:
- logits and losses of both models (fp32) and the labels of our masking against the labels the reference's
  `train_one_epoch` computed and fed its model;
- one optimizer step of the reference's real `train_one_epoch` against one step of our Composer Trainer, in float64,
  where fp32 summation-order noise (1e-7 relative per op, amplified by the LM) vanishes: every gradient within
  1e-9 x max|ref| and every trained weight after the step within 1e-10.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import reference_oracle as oracle
import torch
from step_utils import run_one_step

from flamingo_composer.models.reference_checkpoint import released_state_dict
from flamingo_composer.models.tiny import tiny_model_config

FAMILIES = ["gpt_neox", "llama", "mpt"]
GRID = [(family, seed, n) for family in FAMILIES for seed in (0, 1) for n in (1, 2)]
STEP_GRID = [(family, seed, n) for family in FAMILIES for seed, n in ((0, 1), (1, 2))]


def _id(case) -> str:
    family, seed, n = case
    return f"{family}-seed{seed}-xattn{n}"


def build(tmp_path_factory, case, dtype=torch.float32):
    family, seed, n = case
    workdir = tmp_path_factory.mktemp(f"oracle-{_id(case)}")
    pair = oracle.build_pair(tiny_model_config(family, cross_attn_every_n_layers=n), workdir, seed=seed).to(dtype)
    batch = oracle.reference_batch(pair, seed)
    return pair, batch


@pytest.fixture(scope="module", params=GRID, ids=_id)
def fp32_case(request, tmp_path_factory):
    """Pair, reference batch and the reference's fp32 step (its labels, losses) for one grid point."""
    pair, batch = build(tmp_path_factory, request.param)
    ours = oracle.ours_batch(pair, batch)
    with torch.no_grad():
        logits = {
            name: (
                pair.reference.eval()(oracle.reference_vision_x(sub), sub["input_ids"], sub["attention_mask"],
                                      labels=sub["labels"]),
                pair.ours.model.eval()(sub["images"], sub["image_mask"], sub["input_ids"], sub["attention_mask"],
                                       labels=sub["labels"]),
            )
            for name, sub in ours.items()
        }
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning per frozen non-embedding buffer
        released = oracle.reference_modules().train_utils.filter_state_dict_to_trainable(
            pair.reference, {k: v.clone() for k, v in pair.reference.state_dict().items()}
        )
    step = oracle.reference_train_step(pair, batch)  # trains the reference: run after the forwards above
    return {"pair": pair, "ours": ours, "outputs": logits, "step": step, "case": request.param, "released": released}


def test_every_reference_key_maps(fp32_case):
    pair = fp32_case["pair"]
    report = pair.load_report
    assert report.missing == [] and report.layout == "full"
    assert set(report.loaded) == set(pair.ours.model.state_dict())
    n_layers = len(pair.reference.lang_encoder.old_decoder_blocks)
    n_blocks = n_layers // fp32_case["case"][2]
    assert sum(".gated_cross_attn_layer." in k for k in report.loaded) == 11 * n_blocks  # 11 tensors per block
    assert pair.ours.model.special_token_ids["media"] == pair.reference.media_token_id


def test_export_equals_the_reference_checkpoint_layout(fp32_case):
    """released_state_dict (flamingo-export) = what the reference saves as checkpoint.pt, key for key."""
    want = fp32_case["released"]
    got = released_state_dict(fp32_case["pair"].ours.model)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    if fp32_case["case"][0] == "mpt":  # the tied head is listed under its own name, as the same tensor
        assert got["lang_encoder.lm_head.weight"] is got["lang_encoder.transformer.wte.weight"]


def test_logits_and_losses_match_reference(fp32_case):
    for name, (ref, ours) in fp32_case["outputs"].items():
        assert ours.logits.shape == ref.logits.shape == (*fp32_case["ours"][name]["input_ids"].shape, 105)
        scale = ref.logits.abs().max().item()
        torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-5 * scale, msg=f"{name} logits")
        assert ours.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5), name


def test_our_masking_gives_the_reference_labels(fp32_case):
    step, ours = fp32_case["step"], fp32_case["ours"]
    for name in ("laion", "mmc4"):
        fed = step.inputs[name]  # what train_one_epoch passed to its model
        assert torch.equal(fed["lang_x"], ours[name]["input_ids"]), name
        assert torch.equal(fed["labels"], ours[name]["labels"]), name
        assert (fed["labels"] != -100).sum() > 0, name
    # The reference's in-step losses (train mode) equal our model's on the same batch.
    for name, (_, our_out) in fp32_case["outputs"].items():
        assert step.losses[name] == pytest.approx(our_out.loss.item(), rel=1e-5), name


@pytest.fixture(scope="module", params=STEP_GRID, ids=_id)
def float64_step(request, tmp_path_factory):
    """The reference's `train_one_epoch` step and our Composer step on the same float64 models and batch."""
    pair, batch = build(tmp_path_factory, request.param, torch.float64)
    batch = oracle.without_trailing_padding(batch)
    ours_batch = oracle.ours_batch(pair, batch, torch.float64)
    before = {n: p.detach().clone() for n, p in pair.ours.model.named_parameters() if p.requires_grad}
    with oracle.default_dtype(torch.float64):
        ref = oracle.reference_train_step(pair, batch)
        grads, losses = run_one_step(pair.ours.model, ours_batch)
    after = {n: p.detach().clone() for n, p in pair.ours.model.named_parameters() if p.requires_grad}
    return {"pair": pair, "ref": ref, "grads": {k.removeprefix("model."): g for k, g in grads.items()},
            "losses": losses, "before": before, "after": after}


def test_step_losses_match_reference(float64_step):
    # Both cross-entropies run in float64 here (OraclePair.to drops HF's fp32 cast; ours only upcasts below fp32);
    # ours sums then divides by the global token count where HF takes a mean. Composer logs the losses as fp32.
    ref, losses = float64_step["ref"], float64_step["losses"]
    assert losses["loss/train/laion"] == pytest.approx(ref.losses["laion"], rel=1e-7)
    assert losses["loss/train/mmc4"] == pytest.approx(ref.losses["mmc4"], rel=1e-7)
    assert losses["loss/train/total"] == pytest.approx(0.2 * ref.losses["laion"] + ref.losses["mmc4"], rel=1e-7)


def test_step_gradients_match_reference_in_float64(float64_step):
    pair, ref, ours = float64_step["pair"], float64_step["ref"], float64_step["grads"]
    # The reference's gradient mask leaves only the new-token rows of its (V, D) embedding gradient non-zero.
    embedding = ref.grads[oracle.reference_embedding_key(pair)]
    ids = pair.ours.model.lang_encoder.get_input_embeddings().new_token_ids.tolist()
    others = [row for row in range(embedding.shape[0]) if row not in ids]
    assert torch.count_nonzero(embedding[others]) == 0
    want = oracle.trainable_as_ours(pair, ref.grads)
    assert sorted(ours) == sorted(want)
    worst = 0.0
    for name, grad in ours.items():
        scale = want[name].abs().max().item()
        assert scale > 0, f"{name}: no gradient in the reference"
        err = (grad - want[name]).abs().max().item()
        assert err <= 1e-9 * scale, f"{name}: |ours - ref| = {err:.3g} > 1e-9 x {scale:.3g}"
        worst = max(worst, err / scale)
    print(f"{len(ours)} gradient tensors, worst |ours - ref| / max|ref| = {worst:.2e}")


def test_step_weights_match_reference_in_float64(float64_step):
    pair, ref = float64_step["pair"], float64_step["ref"]
    want_after, want_before = oracle.trainable_as_ours(pair, ref.after), oracle.trainable_as_ours(pair, ref.before)
    for name, after in float64_step["after"].items():
        torch.testing.assert_close(float64_step["before"][name], want_before[name], rtol=0, atol=0)
        torch.testing.assert_close(after, want_after[name], rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        assert (after - float64_step["before"][name]).abs().max() > 1e-6, f"{name} did not move"
    # The reference's frozen embedding rows (original tokens, <PAD>) did not move either.
    key = oracle.reference_embedding_key(pair)
    ids = pair.ours.model.lang_encoder.get_input_embeddings().new_token_ids.tolist()
    changed = (ref.after[key] != ref.before[key]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(ids)


def test_pair_from_a_recipe(tmp_path):
    """What benchmarks/bench_vs_reference.py builds: both models from a training YAML's `model:` section."""
    from train_helpers import RUN_YAML

    pair = oracle.build_pair_from_recipe(RUN_YAML, tmp_path, seed=3)
    assert pair.load_report.missing == [] and pair.config.perceiver_depth == 6  # the reference's fixed perceiver
    assert pair.config.cross_attn_every_n_layers == 1 and pair.seed == 3
    assert type(pair.reference.lang_encoder).__name__ == "GPTNeoXForCausalLM"


def test_bench_vs_reference_stops_with_the_failed_sides_own_error():
    import sys

    from benchmarks import bench_vs_reference as bench
    failing = [sys.executable, "-c", "import sys; sys.exit('data.laion.local: MDS index not found')"]
    with pytest.raises(SystemExit, match=r"(?s)exited 1:.*data\.laion\.local: MDS index not found"):
        bench.run_worker(failing, env={})
    command = bench.side_command("reference", bench.parse_args(["--config", "x.yaml"]))
    assert command[1:4] == ["-m", "benchmarks.bench_vs_reference", "--reference-worker"]


def test_runtime_package_never_imports_the_reference():
    """The oracle is test-only: importing every module of flamingo_composer loads no `open_flamingo`."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, flamingo_composer\n"
        "for m in pkgutil.walk_packages(flamingo_composer.__path__, 'flamingo_composer.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('open_flamingo', 'einops_exts'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_exported_run_checkpoint_loads_into_the_reference_with_equal_logits(tmp_path_factory, tmp_path, capsys):
    """A real short run (MPT, tied head) -> Composer checkpoint -> export CLI -> reference Flamingo, strict=False."""
    import dataclasses

    from omegaconf import OmegaConf
    from train_helpers import RUN_YAML, short_run_overrides, small_data

    from flamingo_composer.training.config import load_config
    from flamingo_composer.training.run import train_from_config

    pair = oracle.build_pair(tiny_model_config("mpt", cross_attn_every_n_layers=1), tmp_path / "files", seed=0)
    recipe = OmegaConf.load(RUN_YAML)
    recipe.model = OmegaConf.create(dataclasses.asdict(pair.config))  # the oracle's files, reference perceiver
    recipe_path = tmp_path / "recipe.yaml"
    OmegaConf.save(recipe, recipe_path)
    out = tmp_path / "run"
    overrides = short_run_overrides(small_data(tmp_path_factory), out, max_duration=2) + ["loggers={}"]
    trainer = train_from_config(load_config(recipe_path, overrides))
    trained = trainer.state.model.model.eval()
    trainer.close()

    from flamingo_composer.cli import export
    checkpoint = out / "checkpoints" / "ep0-ba2-rank0.pt"
    assert export.main([str(checkpoint), "--config", str(recipe_path), "--out", str(tmp_path / "checkpoint.pt")]) == 0
    printed = capsys.readouterr().out
    assert "all mapped" in printed and "not exported (training state): " in printed and "optimizers" in printed

    reference = pair.reference.eval()
    reference.vision_encoder.load_state_dict(trained.vision_encoder.state_dict())  # the frozen CLIP, as released
    batch = oracle.ours_batch(pair, oracle.reference_batch(pair, seed=3))
    sub = batch["mmc4"]
    vision_x = oracle.reference_vision_x(sub)  # (B, T_img, 1, 3, H, W): the reference's form of sub["images"]
    with torch.no_grad():
        before = reference(vision_x, sub["input_ids"], sub["attention_mask"]).logits
        result = reference.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True), strict=False)
        assert result.unexpected_keys == []
        after = reference(vision_x, sub["input_ids"], sub["attention_mask"]).logits
        ours = trained(sub["images"], sub["image_mask"], sub["input_ids"], sub["attention_mask"]).logits
    scale = ours.abs().max().item()
    assert (before - ours).abs().max() > 1e-3 * scale  # the run moved the weights: the load is what matches them
    torch.testing.assert_close(after, ours, rtol=0, atol=1e-5 * scale)
