"""The `ema` algorithm (training/ema.py): trainable float parameters only, never a buffer; training bit for bit that
of a run without it; evaluation on the average; checkpoints holding both, and the tools' --weights flag.
(Resume: test_algorithms.py on one rank, test_fsdp2.py on 2 FSDP2 ranks and 2 -> 1.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.core import Evaluator
from step_utils import LossRecorder, dual_batch, dual_dataspec, set_gates
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.models.factory import build_flamingo
from flamingo_composer.models.tiny import tiny_model_config
from flamingo_composer.training.builders import build_optimizer
from flamingo_composer.training.composer_model import FlamingoComposerModel, heldout_metric_names
from flamingo_composer.training.config import OptimizerConfig, load_config
from flamingo_composer.training.ema import FlamingoEMA, checkpoint_weights, ema_weights_of
from flamingo_composer.training.loss import REQUIRED_TRAINER_KWARGS, StepTokenCounts
from flamingo_composer.training.run import train_from_config

STEPS = 4
HELD_OUT = "laion/LanguageCrossEntropy"


@pytest.mark.parametrize("half_life", ["1ba", "25ba"])
def test_only_trainable_float_parameters_are_averaged_and_no_buffer_changes(half_life):
    """On MPT's tied head (the new tokens' columns come from `new_token_ids`): after training with evaluations
    (the average swapped in and out) every buffer is bit for bit as built, `new_token_ids` included."""
    bundle = build_flamingo(tiny_model_config("mpt"))
    set_gates(bundle.model, 0.5)
    model = FlamingoComposerModel(bundle.model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert any(name.endswith("new_token_ids") for name in buffers)
    batches = [dual_batch(bundle.tokenizer, seed=s) for s in range(3)]
    ema = FlamingoEMA(half_life=half_life)
    trainer = Trainer(
        model=model, train_dataloader=dual_dataspec(batches), max_duration="3ba",
        optimizers=build_optimizer(OptimizerConfig(lr=1e-2), bundle.model),
        eval_dataloader=Evaluator(label="eval", dataloader=dual_dataspec(batches[:1]),
                                  metric_names=heldout_metric_names(["laion", "mmc4"]), device_eval_microbatch_size=4),
        eval_interval="1ba", callbacks=[StepTokenCounts(), ema], device="cpu", precision="fp32", progress_bar=False,
        **REQUIRED_TRAINER_KWARGS,
    )  # fmt: skip
    trainer.fit()
    trainer.close()
    assert set(ema._ema) == {n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    assert ema.updates == 3 and trainer.state.eval_metric_values  # averaged every step, evaluated on the average
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def _config(data_root: Path, out: Path, *extra: str):
    eval_loader = f"eval_loader={{laion: {{format: mds, local: {data_root}/mds/laion, split: val, batch_size: 4}}}}"
    return load_config(RUN_YAML, [
        *short_run_overrides(data_root, out, STEPS), eval_loader, "eval_interval=2", "eval_subset_num_batches=2",
        "loggers={}", "scheduler.t_warmup=0", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run (evaluations at steps 2 and 4) without and with `ema`: (trainer, losses, folder, config)."""
    data_root = small_data(tmp_path_factory)
    done = {}
    for name, extra in (("raw", []), ("ema", ["algorithms.ema={half_life: 2ba}"])):
        out = tmp_path_factory.mktemp(name)
        recorder, cfg = LossRecorder(), _config(data_root, out, *extra)
        trainer = train_from_config(cfg, extra_callbacks=[recorder])
        done[name] = (trainer, dict(recorder.losses), out, cfg)
    yield done
    for trainer, *_ in done.values():
        trainer.close()


def test_training_with_ema_is_bit_for_bit_that_without(runs):
    (raw, raw_losses, *_), (ema, ema_losses, *_) = runs["raw"], runs["ema"]
    assert sorted(ema_losses) == list(range(1, STEPS + 1))
    assert ema_losses == raw_losses  # exactly, eval swaps included
    raw_weights = raw.state.model.state_dict()
    for name, value in ema.state.model.state_dict().items():
        assert torch.equal(value, raw_weights[name]), name


def test_evaluation_runs_on_the_average_and_equals_an_evaluation_of_it_loaded_by_hand(runs, capsys):
    """The EMA run's held-out metric = the same evaluation, without the algorithm, of the raw run's model with the
    average read from the EMA run's checkpoint and copied in by hand."""
    (raw, *_), (ema_run, _, out, _) = runs["raw"], runs["ema"]
    on_raw = float(raw.state.eval_metric_values[HELD_OUT])
    on_ema = float(ema_run.state.eval_metric_values[HELD_OUT])
    saved = torch.load(out / "checkpoints" / f"ep0-ba{STEPS}-rank0.pt", weights_only=False)
    average = ema_weights_of(saved)
    assert average is not None and set(average) == set(saved["state"]["model"])  # the checkpoint holds both
    params = dict(raw.state.model.named_parameters())
    with torch.no_grad():
        for name, tensor in average.items():
            params[name].copy_(tensor)
    raw.eval()
    by_hand = float(raw.state.eval_metric_values[HELD_OUT])
    print(f"held-out LAION CE after {STEPS} steps: raw weights {on_raw:.6f}, EMA weights {on_ema:.6f} "
          f"(half-life 2ba), EMA loaded by hand {by_hand:.6f}")
    assert by_hand == pytest.approx(on_ema, rel=1e-6)
    assert abs(on_ema - on_raw) > 1e-4  # the average is not the raw weights


def test_the_tools_choose_ema_or_raw_weights(runs, tmp_path, capsys):
    from flamingo_composer.cli import export
    from flamingo_composer.eval.checkpoints import load_checkpoint
    checkpoints = {name: out / "checkpoints" / f"ep0-ba{STEPS}-rank0.pt" for name, (_, _, out, _) in runs.items()}
    saved = torch.load(checkpoints["ema"], weights_only=False)
    latents = {"raw": saved["state"]["model"]["model.perceiver.latents"],
               "ema": ema_weights_of(saved)["model.perceiver.latents"]}  # fmt: skip
    assert not torch.equal(latents["raw"], latents["ema"])
    for flag, which in (([], "ema"), (["--weights", "ema"], "ema"), (["--weights", "raw"], "raw")):
        out = tmp_path / f"{which}-{len(flag)}.pt"
        assert export.main([str(checkpoints["ema"]), "--config", str(RUN_YAML), "--out", str(out), *flag]) == 0
        assert f"({which} weights)" in capsys.readouterr().out
        assert torch.equal(torch.load(out, weights_only=True)["perceiver.latents"], latents[which])
    assert export.main([str(checkpoints["raw"]), "--config", str(RUN_YAML), "--out", str(tmp_path / "x.pt"),
                        "--weights", "ema"]) == 2  # fmt: skip
    assert "holds no EMA weights" in capsys.readouterr().err
    assert checkpoint_weights(torch.load(checkpoints["raw"], weights_only=False))[1] == "raw"  # auto: what there is
    flamingo = build_flamingo(runs["ema"][3].model).model
    for which in ("ema", "raw"):
        summary = load_checkpoint(flamingo, checkpoints["ema"], weights=which)  # flamingo-evaluate's loader
        assert summary["weights"] == which and torch.equal(flamingo.perceiver.latents.detach(), latents[which])


def test_the_tools_state_their_default_in_help(capsys):
    from flamingo_composer.cli import evaluate, export

    for tool in (evaluate, export):
        with pytest.raises(SystemExit):
            tool.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--weights {auto,ema,raw}" in text and "default auto = the EMA average when" in text, tool



def test_the_run_summary_says_which_weights_were_evaluated(runs):
    from flamingo_composer.training.summary import run_summary

    for name, (trainer, _, _, cfg) in runs.items():
        line = next(x for x in run_summary(trainer, cfg, str(RUN_YAML)).splitlines() if "held-out" in x)
        assert ("last evaluation, EMA weights" in line) == (name == "ema"), line
