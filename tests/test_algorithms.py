"""The algorithm allowlist (training/algorithms.py): every Composer algorithm classified, refused ones stopped at
config load with their reason, supported ones trained, checkpointed and resumed exactly, `NAME: null` removing an
inherited entry, and parameters an algorithm adds saved and restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.algorithms import GradientClipping
from composer.core import Algorithm, Callback, Event
from step_utils import LossRecorder
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.training import algorithms as allowlist
from flamingo_composer.training import run as run_module
from flamingo_composer.training.config import load_config
from flamingo_composer.training.ema import FlamingoEMA
from flamingo_composer.training.run import main, train_from_config

STEPS = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


def _overrides(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [*short_run_overrides(data_root, out, STEPS), "save_interval=1", "autoresume=true", "loggers={}", *extra]


def test_every_algorithm_of_the_installed_composer_is_classified():
    offered = set(allowlist.composer_algorithm_names())
    assert allowlist.unclassified() == []
    assert set(allowlist.SUPPORTED) | set(allowlist.REFUSED) == offered  # no stale entry either
    assert not set(allowlist.SUPPORTED) & set(allowlist.REFUSED)
    assert all(len(reason) > 20 for reason in allowlist.REFUSED.values())


def test_an_algorithm_nobody_classified_is_reported(monkeypatch):
    import composer.algorithms

    class Shiny(Algorithm):
        def match(self, event, state):
            return False

        def apply(self, event, state, logger):
            pass

    Shiny.__module__ = "composer.algorithms.shiny.shiny"
    monkeypatch.setattr(composer.algorithms, "Shiny", Shiny, raising=False)
    monkeypatch.setattr(composer.algorithms, "__all__", [*composer.algorithms.__all__, "Shiny"])
    assert allowlist.unclassified() == ["shiny"]


def _refuse_to_build(monkeypatch):
    monkeypatch.setattr(run_module, "build_flamingo", lambda *a, **k: pytest.fail("the model was built"))


@pytest.mark.parametrize("name", sorted(allowlist.REFUSED))
def test_a_refused_algorithm_stops_the_run_at_config_load_with_its_reason(name, data_root, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    _refuse_to_build(monkeypatch)
    assert main([str(RUN_YAML), *_overrides(data_root, tmp_path), f"algorithms.{name}={{}}"]) == 2
    assert f"config error: algorithms.{name}: {allowlist.REFUSED[name]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("algorithms.ema={half_life: 10ep, update_interval: 1ba}",
         "algorithms.ema: half_life: '10ep' must be counted in batches"),
        ("algorithms.ema={half_life: 10ba, smoothing: 0.9}", "algorithms.ema: give exactly one of half_life"),
        ("algorithms.gradient_clipping.clipping_type=nrm",
         "algorithms.gradient_clipping: clipping_type: must be one of"),
        ("algorithms.gradient_clipping.clipping_threshold=-1",
         "algorithms.gradient_clipping: clipping_threshold: must"),
        ("algorithms.gradient_clipping.clip=1", "unknown key 'algorithms.gradient_clipping.clip'"),
        ("algorithms.sharpness={}",
         "algorithms.sharpness: unknown name 'sharpness'; supported: ['ema', 'gradient_clipping']"),
    ],
)  # fmt: skip
def test_algorithm_argument_checks_run_at_config_load(override, message, data_root, tmp_path, capsys, monkeypatch):
    _refuse_to_build(monkeypatch)
    assert main([str(RUN_YAML), *_overrides(data_root, tmp_path), override]) == 2
    assert f"config error: {message}" in capsys.readouterr().err


def test_null_removes_an_inherited_algorithm_as_an_override_and_in_a_recipe(data_root, tmp_path):
    cfg = load_config(RUN_YAML, [*_overrides(data_root, tmp_path), "algorithms.gradient_clipping=null"])
    assert cfg.algorithms == {}
    trainer = train_from_config(cfg, fit=False)
    assert trainer.state.algorithms == []  # no clipping algorithm in the Trainer
    trainer.close()
    recipe = tmp_path / "no-clipping.yaml"
    recipe.write_text(f"base: {RUN_YAML}\nalgorithms: {{gradient_clipping: null, ema: {{half_life: 10ba}}}}\n"
                      "callbacks: {xattn_gates: null}\n")  # fmt: skip
    cfg = load_config(recipe, _overrides(data_root, tmp_path))
    assert list(cfg.algorithms) == ["ema"] and "xattn_gates" not in cfg.callbacks
    assert load_config(RUN_YAML, _overrides(data_root, tmp_path, "algorithms={}")).algorithms  # {} merges: kept


def _run(cfg, algorithms=(), callbacks=()):
    recorder = LossRecorder()
    trainer = train_from_config(cfg, extra_callbacks=[recorder, *callbacks], extra_algorithms=algorithms, fit=False)
    trainer.fit()
    return trainer, dict(recorder.losses)


class Crash(Callback):
    """The process dies at the start of step `step` (after the previous step's checkpoint), as a killed job."""

    def __init__(self, step: int):
        self.step = step

    def batch_start(self, state, logger):
        if int(state.timestamp.batch) + 1 == self.step:
            raise KeyboardInterrupt(f"killed at the start of step {self.step}")


def _ema(trainer) -> dict[str, torch.Tensor]:
    (ema,) = [c for c in trainer.state.callbacks if isinstance(c, FlamingoEMA)]
    return {name: tensor.clone() for name, tensor in ema._ema.items()}


@pytest.mark.parametrize("name,kwargs", [("gradient_clipping", "{clipping_type: norm, clipping_threshold: 0.01}"),
                                         ("ema", "{half_life: 2ba}")])  # fmt: skip
def test_a_supported_algorithm_trains_checkpoints_and_resumes_exactly(name, kwargs, data_root, tmp_path):
    """3 steps straight against a run killed at the start of step 3 (its checkpoint of step 2 written), then a new
    Trainer autoresuming from that checkpoint for the third."""
    extra = [
        *(f"algorithms.{other}=null" for other in allowlist.SUPPORTED if other != name),
        f"algorithms.{name}={kwargs}",
    ]
    straight, straight_losses = _run(load_config(RUN_YAML, _overrides(data_root, tmp_path / "straight", *extra)))
    supported = allowlist.SUPPORTED[name].build  # ema runs as a callback (training/ema.py)
    assert [type(a) for a in [*straight.state.algorithms, *straight.state.callbacks] if type(a) in
            (GradientClipping, FlamingoEMA)] == [supported]  # fmt: skip
    cfg = load_config(RUN_YAML, _overrides(data_root, tmp_path / "stopped", *extra))
    recorder = LossRecorder()
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cfg, extra_callbacks=[recorder, Crash(step=3)])
    first_losses = dict(recorder.losses)
    resumed, resumed_losses = _run(cfg)
    assert sorted(first_losses) == [1, 2] and sorted(resumed_losses) == [3]
    assert {**first_losses, **resumed_losses} == straight_losses  # exactly: same machine, same arithmetic
    for (key, a), b in zip(straight.state.model.state_dict().items(), resumed.state.model.state_dict().values()):
        assert torch.equal(a, b), key
    if name == "ema":
        ema, resumed_ema = _ema(straight), _ema(resumed)
        assert ema.keys() == resumed_ema.keys() and all(torch.equal(ema[k], resumed_ema[k]) for k in ema)
        weights = dict(straight.state.model.named_parameters())
        assert any(not torch.equal(ema[k], weights[k]) for k in ema)  # an average, not a copy of the weights
    straight.close()
    resumed.close()


class AddsAParameter(Algorithm):
    """At INIT, a new trainable parameter in the perceiver, handed to the optimizer (as module surgery does), that
    scales the first cross-attention block's output (so it has a gradient while the gates are still closed)."""

    def match(self, event, state):
        return event == Event.INIT

    def apply(self, event, state, logger):
        from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

        flamingo = state.model.model
        flamingo.perceiver.extra_scale = scale = torch.nn.Parameter(torch.full((3,), 0.5))
        state.optimizers[0].add_param_group({"params": [scale], "weight_decay": 0.0})
        block = next(m for m in flamingo.modules() if isinstance(m, GatedCrossAttentionBlock))
        block.register_forward_hook(lambda module, args, out: out * scale.mean())


def test_a_parameter_an_algorithm_adds_is_saved_and_resumed(data_root, tmp_path):
    cfg = load_config(RUN_YAML, _overrides(data_root, tmp_path))
    trainer, _ = _run(cfg, algorithms=[AddsAParameter()])  # (the first steps are the warm-up's, at lr 0)
    trained = trainer.state.model.model.perceiver.extra_scale.detach().clone()
    assert not torch.equal(trained, torch.full((3,), 0.5))  # it trained
    trainer.close()
    saved = torch.load(tmp_path / "checkpoints" / f"ep0-ba{STEPS}-rank0.pt", weights_only=False)["state"]["model"]
    assert torch.equal(saved["model.perceiver.extra_scale"], trained)
    cfg = load_config(RUN_YAML, _overrides(data_root, tmp_path, f"max_duration={STEPS + 1}"))
    resumed = train_from_config(cfg, extra_algorithms=[AddsAParameter()], fit=False)
    assert torch.equal(resumed.state.model.model.perceiver.extra_scale.detach(), trained)  # not re-initialised
    resumed.close()


def test_the_readme_table_lists_every_algorithm_with_its_status():
    import re

    from train_helpers import REPO_ROOT

    rows = re.findall(r"^\| (`[^|]+`) \| (supported|refused) \|", (REPO_ROOT / "README.md").read_text(), re.M)
    listed = {name.strip(" `"): status for names, status in rows for name in names.split(",")}
    assert listed == {**{n: "supported" for n in allowlist.SUPPORTED}, **{n: "refused" for n in allowlist.REFUSED}}


def test_the_algorithm_recipes_compose_on_top_of_a_recipe(data_root, tmp_path):
    from train_helpers import REPO_ROOT

    yamls = REPO_ROOT / "yamls"
    released = load_config(yamls / "openflamingo-3b.yaml")  # openflamingo-base composes algorithms/reference.yaml
    assert released.algorithms == {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}
    assert {"nan_monitor", "loss_spike", "xattn_gates"} <= set(released.callbacks)  # monitors on by default
    for recipe, qk_norm in (("stable.yaml", False), ("stable-scratch.yaml", True)):
        top = tmp_path / f"top-{recipe}"
        top.write_text(f"base: [{yamls / 'openflamingo-3b.yaml'}, {yamls / 'algorithms' / recipe}]\n")
        cfg = load_config(top)
        assert cfg.algorithms == {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0},
                                  "ema": {"half_life": "1000ba", "update_interval": "1ba"}}  # fmt: skip
        assert cfg.loss.z_loss_weight == 1e-4 and cfg.save_interval == "1000ba" and cfg.model.qk_norm == qk_norm
        assert cfg.callbacks["loss_spike"]["stop"] is False and cfg.run_name == released.run_name
    run_yaml = load_config(RUN_YAML, _overrides(data_root, tmp_path))
    assert {"nan_monitor", "loss_spike", "xattn_gates"} <= set(run_yaml.callbacks)
