"""flamingo-export: our trainable-only checkpoint -> released-format checkpoint.pt (reference names).

On the reference fixture (a checkpoint.pt written by open-flamingo 2.0.1 itself): import with
flamingo-import, export again, and get the very same tensors, byte for byte. Keys that do not fit
are reported, and nothing is written. (Live checks against the reference package: tests/test_reference_live.py.)
"""

from __future__ import annotations

import pytest
import torch
import yaml
from step_utils import REFERENCE_FIXTURE

from flamingo_composer.cli import export
from flamingo_composer.cli import import_checkpoint as importer


@pytest.fixture(scope="module")
def fixture_config(tmp_path_factory):
    """A model config of the fixture's architecture (ViT json, LM and tokenizer dir, xattn every 2)."""
    path = tmp_path_factory.mktemp("export") / "model.yaml"
    path.write_text(yaml.safe_dump({"model": {
        "vision": {"config_path": str(REFERENCE_FIXTURE / "vision" / "of-tiny-vit-small.json")},
        "lm": {"name": str(REFERENCE_FIXTURE / "lm")},
        "tokenizer": {"name": str(REFERENCE_FIXTURE / "lm")},
        "cross_attn_every_n_layers": 2,
        "seed": 0,
    }}))
    return path


@pytest.fixture(scope="module")
def imported(fixture_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "trainable.pt"
    argv = [
        "--config", str(fixture_config), "--checkpoint", str(REFERENCE_FIXTURE / "checkpoint.pt"), "--out", str(out)
    ]
    assert importer.main(argv) == 0
    return out


def test_import_then_export_gives_the_reference_checkpoint_byte_for_byte(imported, fixture_config, tmp_path, capsys):
    out = tmp_path / "checkpoint.pt"
    assert export.main([str(imported), "--config", str(fixture_config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # The untied head embed_out is frozen: the reference keeps it for its name, we take it from the recipe's LM.
    assert "from the recipe's frozen LM (kept as the reference keeps them): lang_encoder.embed_out.weight" in printed
    want = torch.load(REFERENCE_FIXTURE / "checkpoint.pt", weights_only=True)
    got = torch.load(out, weights_only=True)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert got[key].numpy().tobytes() == tensor.numpy().tobytes(), key


def test_every_source_key_is_mapped_or_reported(imported, fixture_config, tmp_path, capsys):
    trainable = torch.load(imported, weights_only=True)
    gate = "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.attn_gate"
    broken = {k: v for k, v in trainable.items() if k != gate}
    broken["perceiver.layers.0.0.to_qq.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    out = tmp_path / "checkpoint.pt"
    assert export.main([str(path), "--config", str(fixture_config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unexpected key 'perceiver.layers.0.0.to_qq.weight'" in err
    assert gate in err and "trainable parameters missing" in err
    assert not out.exists()


def test_unreadable_checkpoints_are_refused_with_the_reason(fixture_config, tmp_path, capsys):
    (tmp_path / "sharded").mkdir()
    assert export.main([str(tmp_path / "sharded"), "--config", str(fixture_config), "--out", str(tmp_path / "o")]) == 2
    assert "sharded checkpoint" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nope.pt"), "--config", str(fixture_config), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
