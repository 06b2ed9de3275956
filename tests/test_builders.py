"""Builders: SPEC 3's weight-decay groups and lr*wd conversion, schedule shapes, registries, callbacks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Time, Timestamp, TimeUnit
from composer.loggers import FileLogger, InMemoryLogger, WandBLogger
from composer.optim import DecoupledAdamW

from flamingo_composer.models.factory import build_flamingo
from flamingo_composer.models.tiny import tiny_model_config
from flamingo_composer.training.builders import (
    build_algorithms,
    build_callbacks,
    build_loggers,
    build_optimizer,
    build_scheduler,
    split_decay_groups,
)
from flamingo_composer.training.callbacks import DataPositionCallback, DataSkipLogger
from flamingo_composer.training.config import OptimizerConfig, SchedulerConfig
from flamingo_composer.training.ema import FlamingoEMA


@pytest.fixture(scope="module")
def flamingo():
    return build_flamingo(tiny_model_config("gpt_neox", cross_attn_every_n_layers=1)).model


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_decay_groups_follow_spec3(flamingo):
    decay, no_decay = split_decay_groups(flamingo, decay_gates_and_norms=True)
    trainable = _trainable(flamingo)
    # SPEC 3: every cross-attention parameter (norms and gates too) decays; perceiver and new-token rows do not.
    assert set(decay) == {n for n in trainable if ".gated_cross_attn_layer." in n}
    assert set(no_decay) == {
        n for n in trainable if n.startswith("perceiver.") or n.endswith("trainable_rows.weight")
    }
    assert set(decay) | set(no_decay) == set(trainable) and not set(decay) & set(no_decay)
    assert any(n.endswith("attn_gate") for n in decay) and any(n.endswith("attn.norm.weight") for n in decay)
    assert any(n.endswith("ff.0.weight") for n in decay)  # the FF LayerNorm


def test_decay_option_excludes_gates_and_norms(flamingo):
    decay, no_decay = split_decay_groups(flamingo, decay_gates_and_norms=False)
    xattn = {n for n in _trainable(flamingo) if ".gated_cross_attn_layer." in n}
    gates_and_norms = {
        n for n in xattn if n.endswith(("_gate", "norm.weight", "norm.bias", "ff.0.weight", "ff.0.bias"))
    }
    assert gates_and_norms and set(decay) == xattn - gates_and_norms
    assert gates_and_norms <= set(no_decay)


def test_default_optimizer_is_torch_adamw_with_the_fused_kernel(flamingo):
    opt = build_optimizer(OptimizerConfig(lr=1e-4, weight_decay=0.1), flamingo)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # torch-AdamW terms, as the reference
    unfused = build_optimizer(OptimizerConfig(fused=False), flamingo)
    assert not unfused.defaults["fused"]
    with pytest.raises(ValueError, match="fused: only adamw has a fused kernel, not 'decoupled_adamw'"):
        OptimizerConfig(name="decoupled_adamw", fused=True)


def test_optimizer_groups_betas_and_decoupled_decay(flamingo):
    cfg = OptimizerConfig(name="decoupled_adamw", lr=1e-4, weight_decay=0.1)
    opt = build_optimizer(cfg, flamingo)
    assert isinstance(opt, DecoupledAdamW)
    decay_group, no_decay_group = opt.param_groups
    assert decay_group["weight_decay"] == pytest.approx(1e-5)  # lr * wd: Composer's decay is not scaled by lr
    assert no_decay_group["weight_decay"] == 0.0
    assert decay_group["betas"] == (0.9, 0.999) and decay_group["eps"] == 1e-8  # not Composer's (0.9, 0.95)
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in _trainable(flamingo).values()}  # trainable parameters only


def test_decoupled_step_equals_torch_adamw_in_reference_convention():
    """DecoupledAdamW(wd = lr * 0.1) makes the same update as torch AdamW(wd = 0.1), fused or not: the conversion
    is right and the fused kernel computes the reference's update."""
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(3)]
    results = []
    for name, fused in (("decoupled_adamw", None), ("adamw", False), ("adamw", True)):
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(w0.clone())
        # Put the parameter in the decay group the way the builder sees it: fake a cross-attention block.
        from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

        block = GatedCrossAttentionBlock(dim=4, dim_visual=4, dim_head=2, heads=1)
        block.requires_grad_(False)
        block.register_parameter("extra", model.w)
        opt = build_optimizer(OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1, fused=fused), block)
        for g in grads:
            model.w.grad = g.clone()
            opt.step()
        results.append(model.w.detach().clone())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(results[0], w0)


def _multipliers(scheduler, steps, max_duration=100):
    out = []
    for step in steps:
        state = SimpleNamespace(
            timestamp=Timestamp(batch=step),
            max_duration=Time(max_duration, TimeUnit.BATCH),
            dataloader_len=Time(max_duration, TimeUnit.BATCH),
        )
        out.append(scheduler(state))
    return out


@pytest.mark.parametrize(
    ("name", "alpha_f", "expected"),
    [
        ("constant_with_warmup", None, [0.0, 0.5, 1.0, 1.0, 1.0]),
        ("linear_decay_with_warmup", 0.1, [0.0, 0.5, 1.0, 0.55, 0.1]),
        ("cosine_with_warmup", 0.0, [0.0, 0.5, 1.0, 0.5, 0.0]),
    ],
)
def test_scheduler_warmup_shapes_in_batches(name, alpha_f, expected):
    scheduler = build_scheduler(SchedulerConfig(name=name, t_warmup=10, alpha_f=alpha_f))
    assert _multipliers(scheduler, [0, 5, 10, 55, 100]) == pytest.approx(expected, abs=1e-6)


def test_unknown_names_list_registered_ones(flamingo):
    with pytest.raises(
        ValueError, match=r"optimizer.name: unknown name 'sgd'; registered: \['adamw', 'decoupled_adamw'\]"
    ):
        build_optimizer(OptimizerConfig(name="sgd"), flamingo)
    with pytest.raises(ValueError, match=r"loggers.tensorboard: unknown name .*'file', 'inmemory', 'wandb'"):
        build_loggers({"tensorboard": {}})
    with pytest.raises(ValueError, match=r"callbacks.nan: unknown name .*'data_skips'"):
        build_callbacks({"nan": {}})
    with pytest.raises(ValueError, match=r"algorithms.clip: unknown name .*'gradient_clipping'"):
        build_algorithms({"clip": {}})


def test_components_built_from_names(tmp_path):
    algorithms = build_algorithms(
        {
            "gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0},
            "ema": {"half_life": "10ba"},
        }
    )
    assert isinstance(algorithms[0], GradientClipping) and algorithms[0].clipping_threshold == 1.0
    assert isinstance(algorithms[1], FlamingoEMA)  # the allowlist's ema (training/ema.py)
    wandb, file_logger, memory = build_loggers(
        {
            "wandb": {"project": "p", "offline": True, "dir": str(tmp_path)},
            "file": {"filename": str(tmp_path / "x.txt")},
            "inmemory": {},
        }
    )
    assert isinstance(wandb, WandBLogger) and wandb._init_kwargs["mode"] == "offline"
    assert wandb._init_kwargs["dir"] == str(tmp_path) and wandb._init_kwargs["project"] == "p"
    assert isinstance(file_logger, FileLogger) and isinstance(memory, InMemoryLogger)
    callbacks = build_callbacks({"speed_monitor": {"window_size": 3}, "lr_monitor": {}, "data_skips": {}})
    assert [type(c) for c in callbacks] == [SpeedMonitor, LRMonitor, DataSkipLogger]


class _Recorder:
    def __init__(self):
        self.logged: list[dict] = []

    def log_metrics(self, metrics):
        self.logged.append(dict(metrics))


def _state(batch, step):
    return SimpleNamespace(batch=batch, timestamp=SimpleNamespace(batch=Time(step, TimeUnit.BATCH)))


def test_data_skip_logger_cumulative_and_resumable():
    batches = [
        {"laion": {"skipped": {"corrupt_image": 2}}, "mmc4": {"skipped": {}, "dropped_images": {"missing_image": 2}}},
        {
            "laion": {"skipped": {"corrupt_image": 1, "empty_caption": 1}},
            "mmc4": {"skipped": {"low_similarity": 3}, "dropped_images": {"missing_image": 1, "corrupt_image": 1}},
        },
        {"laion": {"skipped": {}}, "mmc4": {"skipped": {"low_similarity": 1}, "dropped_images": {}}},
    ]
    logger, recorder = DataSkipLogger(log_interval=2), _Recorder()
    for step, batch in enumerate(batches[:2], start=1):
        logger.after_dataloader(_state(batch, step), recorder)
        logger.batch_end(_state(batch, step), recorder)
    assert recorder.logged == [
        {
            "data/skipped/laion/corrupt_image": 3,
            "data/skipped/laion/empty_caption": 1,
            "data/skipped/mmc4/low_similarity": 3,
            "data/dropped_images/mmc4/corrupt_image": 1,
            "data/dropped_images/mmc4/missing_image": 3,
        }
    ]  # logged at batch 2 only (interval 2), cumulative; images lost by kept samples apart from skipped samples
    saved = logger.state_dict()
    resumed, recorder = DataSkipLogger(log_interval=1), _Recorder()
    resumed.load_state_dict(saved)
    resumed.after_dataloader(_state(batches[2], 3), recorder)
    resumed.batch_end(_state(batches[2], 3), recorder)
    assert recorder.logged[-1]["data/skipped/mmc4/low_similarity"] == 4  # totals survive resume
    assert recorder.logged[-1]["data/skipped/laion/corrupt_image"] == 3
    assert recorder.logged[-1]["data/dropped_images/mmc4/missing_image"] == 3

    older, recorder = DataSkipLogger(), _Recorder()  # a checkpoint written before images were counted
    older.load_state_dict({"totals": {"laion/corrupt_image": 5}})
    older.fit_end(_state(batches[2], 4), recorder)
    assert recorder.logged == [{"data/skipped/laion/corrupt_image": 5}]


def test_data_position_callback_round_trip():
    class Loader:
        def __init__(self):
            self.position = 0

        def state_dict(self):
            return {"positions": {"laion": [self.position]}}

        def load_state_dict(self, state):
            self.position = state["positions"]["laion"][0]

    source, target = Loader(), Loader()
    source.position = 37
    DataPositionCallback(target).load_state_dict(DataPositionCallback(source).state_dict())
    assert target.position == 37
    with pytest.raises(TypeError, match="has no state_dict"):
        DataPositionCallback(object())
