"""`model.qk_norm`: LayerNorms on the queries and keys of the perceiver and the cross-attention; they train, are
checkpointed and resumed; the released format has no such weights, so its loader and the exporter refuse them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from step_utils import REFERENCE_FIXTURE, dual_batch, run_one_step, tiny_bundle
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.config_schema import ConfigError
from flamingo_composer.models.cross_attention import MaskedCrossAttention
from flamingo_composer.models.factory import (
    FlamingoModelConfig,
    LMConfig,
    TokenizerConfig,
    VisionConfig,
    build_flamingo,
)
from flamingo_composer.models.perceiver import PerceiverAttention
from flamingo_composer.models.reference_checkpoint import (
    ReferenceCheckpointError,
    load_reference_state_dict,
    released_state_dict,
)
from flamingo_composer.training.config import load_config
from flamingo_composer.training.run import train_from_config


def test_qk_norm_puts_trainable_layernorms_on_queries_and_keys_and_they_train():
    plain, normed = tiny_bundle(), tiny_bundle(qk_norm=True)
    attentions = [m for m in normed.model.modules() if isinstance(m, PerceiverAttention | MaskedCrossAttention)]
    assert len(attentions) == 2 + 2  # perceiver depth 2, a block before each of the 2 LM layers
    for module in attentions:
        for norm in (module.q_norm, module.k_norm):
            assert isinstance(norm, torch.nn.LayerNorm) and norm.normalized_shape == (module.to_q.out_features
                                                                                       // module.heads,)
            assert norm.weight.requires_grad and norm.bias.requires_grad
    assert not any(hasattr(m, "q_norm") for m in plain.model.modules())
    sub = dual_batch(plain.tokenizer)["mmc4"]
    inputs = {k: sub[k] for k in ("images", "image_mask", "input_ids", "attention_mask")}
    with torch.no_grad():
        assert (normed.model(**inputs).logits - plain.model(**inputs).logits).abs().max() > 1e-3  # they act
    grads, _ = run_one_step(normed.model, dual_batch(normed.tokenizer), clip=None)
    norm_grads = {n: g for n, g in grads.items() if "_norm." in n and (".q_norm." in n or ".k_norm." in n)}
    assert len(norm_grads) == 4 * 2 * 2 and all(g.abs().sum() > 0 for g in norm_grads.values())


def test_qk_norm_weights_are_checkpointed_and_resumed(tmp_path_factory, tmp_path):
    overrides = [*short_run_overrides(small_data(tmp_path_factory), tmp_path, 3), "model.qk_norm=true", "loggers={}",
                 "save_interval=3", "autoresume=true"]  # fmt: skip
    trainer = train_from_config(load_config(RUN_YAML, overrides))
    trained = {n: p.detach().clone() for n, p in trainer.state.model.named_parameters() if "_norm." in n}
    trainer.close()
    saved = torch.load(tmp_path / "checkpoints" / "ep0-ba3-rank0.pt", weights_only=False)["state"]["model"]
    qk = {n for n in saved if ".q_norm." in n or ".k_norm." in n}
    assert len(qk) == 16 and all(torch.equal(saved[n], trained[n]) for n in qk)
    assert any(not torch.equal(saved[n], torch.ones_like(saved[n])) for n in qk if n.endswith("weight"))  # trained
    resumed = train_from_config(load_config(RUN_YAML, [*overrides, "max_duration=4"]), fit=False)
    params = dict(resumed.state.model.named_parameters())
    assert all(torch.equal(params[n].detach(), trained[n]) for n in qk)
    resumed.close()


def _fixture_model_config(qk_norm: bool) -> FlamingoModelConfig:
    return FlamingoModelConfig(
        vision=VisionConfig(config_path=str(REFERENCE_FIXTURE / "vision" / "of-tiny-vit-small.json")),
        lm=LMConfig(name=str(REFERENCE_FIXTURE / "lm")), tokenizer=TokenizerConfig(name=str(REFERENCE_FIXTURE / "lm")),
        cross_attn_every_n_layers=2, seed=0, qk_norm=qk_norm,
    )  # fmt: skip


def test_the_released_format_refuses_qk_norm_in_loader_exporter_and_config(tmp_path_factory, tmp_path, capsys):
    model = build_flamingo(_fixture_model_config(qk_norm=True)).model
    with pytest.raises(ReferenceCheckpointError, match="model.qk_norm: true.*released OpenFlamingo format has no"):
        load_reference_state_dict(model, REFERENCE_FIXTURE / "checkpoint.pt")
    with pytest.raises(ReferenceCheckpointError, match="qk-norm.*the released format cannot hold this model"):
        released_state_dict(model)
    # Our own checkpoints of such a model load (they hold the norms).
    ours = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert load_reference_state_dict(model, ours, layout="checkpoint").loaded

    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump({"model": {**dataclasses.asdict(_fixture_model_config(qk_norm=True))}}))
    trainable = tmp_path / "trainable.pt"
    torch.save(ours, trainable)
    from flamingo_composer.cli import export
    assert export.main([str(trainable), "--config", str(config), "--out", str(tmp_path / "out.pt")]) == 1
    assert "model.qk_norm: true" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()
    with pytest.raises(
        ConfigError, match="load_reference_checkpoint: a released OpenFlamingo checkpoint has no qk-norm"
    ):
        load_config(RUN_YAML, [f"variables.data_root={small_data(tmp_path_factory)}", "model.qk_norm=true",
                               f"load_reference_checkpoint={REFERENCE_FIXTURE / 'checkpoint.pt'}"])  # fmt: skip


def test_the_model_without_qk_norm_is_unchanged():
    """qk_norm off (the default) builds the reference's modules: no extra parameter, the same keys."""
    bundle = tiny_bundle()
    assert not [n for n, _ in bundle.model.named_parameters() if "q_norm" in n or "k_norm" in n]
