"""FSDP wrap and activation-checkpointing policies, decided on CPU (FSDP itself needs GPUs).

Units are computed with torch's own `CustomPolicy` and Composer's decision rule (`_fsdp_wrap`, else the child's
`fsdp_wrap_fn`), then checked: frozen and trainable parameters never share a unit, and each block type that must
be its own unit is one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock
from flamingo_composer.models.embeddings import NewTokenRows
from flamingo_composer.models.factory import build_flamingo
from flamingo_composer.models.lm_adapter import FlamingoLayer
from flamingo_composer.models.perceiver import PerceiverResampler
from flamingo_composer.models.tiny import tiny_model_config
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.fsdp import install_fsdp_policies, simulate_fsdp_units


@pytest.fixture(scope="module", params=["gpt_neox", "mpt"])
def composer_model(request):
    """GPT-NeoX (untied head) and MPT (tied head, as the 3B/9B recipes), cross-attention before every layer."""
    bundle = build_flamingo(tiny_model_config(request.param, cross_attn_every_n_layers=1))
    model = FlamingoComposerModel(bundle.model)
    install_fsdp_policies(model)
    return model


def test_no_unit_mixes_frozen_and_trainable(composer_model):
    flamingo = composer_model.model
    params = dict(flamingo.named_parameters(remove_duplicate=False))
    units = simulate_fsdp_units(flamingo)
    assert sum(len(names) for names in units.values()) == len(params)  # every parameter in exactly one unit
    for unit, names in units.items():
        flags = {params[n].requires_grad for n in names}
        assert len(flags) <= 1, f"unit {unit or '<root>'} mixes frozen and trainable: {names}"
    # the root keeps only frozen leftovers (patch embedding, final norms, the frozen embedding matrix, the head)
    assert not any(params[n].requires_grad for n in units[""])


def test_each_block_is_its_own_unit(composer_model):
    flamingo = composer_model.model
    units = set(simulate_fsdp_units(flamingo)) - {""}
    unit_types = [PerceiverResampler, GatedCrossAttentionBlock, NewTokenRows]
    unit_types += [*flamingo.decoder_layer_classes, *flamingo.vision_block_classes]
    expected = {name for name, m in flamingo.named_modules() if type(m) in unit_types}
    assert units == expected
    kinds = {
        "perceiver": [n for n in units if n == "perceiver"],
        "vision blocks": [n for n in units if n.startswith("vision_encoder.") and "resblocks" in n],
        "decoder layers": [n for n in units if n.endswith(".decoder_layer")],
        "cross-attention blocks": [n for n in units if n.endswith(".gated_cross_attn_layer")],
        "new-token rows": [n for n in units if n.endswith("trainable_rows")],
    }
    num_layers = sum(isinstance(m, FlamingoLayer) for m in flamingo.modules())
    assert len(kinds["perceiver"]) == 1 and len(kinds["new-token rows"]) == 1
    assert len(kinds["decoder layers"]) == num_layers == len(kinds["cross-attention blocks"]) == 2
    assert len(kinds["vision blocks"]) == 2  # tiny ViT: 2 residual blocks
    # The new-token rows' unit holds exactly the trainable rows.
    rows_unit = kinds["new-token rows"][0]
    assert simulate_fsdp_units(flamingo)[rows_unit] == [f"{rows_unit}.weight"]


def test_activation_checkpointing_policy(composer_model):
    flamingo = composer_model.model
    ac = flamingo.activation_checkpointing_fn
    chosen = {type(m) for m in flamingo.modules() if ac(m)}
    assert chosen == {*flamingo.decoder_layer_classes, GatedCrossAttentionBlock}
    assert not any(
        ac(m) for m in flamingo.modules() if isinstance(m, FlamingoLayer)
    )  # it reads the media context


def test_explicit_fsdp_wrap_attribute_wins(composer_model):
    flamingo = composer_model.model
    block = next(m for m in flamingo.modules() if isinstance(m, GatedCrossAttentionBlock))
    block.ff._fsdp_wrap = True  # a sub-unit inside a block: only the block's trainable FF goes there
    try:
        units = simulate_fsdp_units(flamingo)
        ff_units = [u for u in units if u.endswith("gated_cross_attn_layer.ff")]
        assert len(ff_units) == 1 and all(".ff." in n for n in units[ff_units[0]])
    finally:
        del block.ff._fsdp_wrap


def test_single_child_required():
    class TwoChildren(FlamingoComposerModel):
        def __init__(self, model):
            super().__init__(model)
            self.extra_head = nn.Linear(2, 2)  # would become a second FSDP root: per-root clipping

    bundle = build_flamingo(tiny_model_config("gpt_neox"))
    with pytest.raises(ValueError, match=r"single child 'model'.*\['model', 'extra_head'\]"):
        install_fsdp_policies(TwoChildren(bundle.model))


def test_trainable_rows_still_spliced_and_learned():
    """Moving the rows into their own module keeps the look-up and their gradient."""
    bundle = build_flamingo(tiny_model_config("mpt"))
    emb = bundle.model.lang_encoder.get_input_embeddings()
    ids = torch.tensor([[int(i) for i in emb.new_token_ids] + [3]])
    out = emb(ids)  # (1, 3, D)
    assert torch.equal(out[0, :2], emb.new_token_rows.detach()) and torch.equal(out[0, 2], emb.weight[3])
    out.sum().backward()
    assert emb.new_token_rows.grad is not None and emb.weight.grad is None


def test_the_outermost_fsdp2_unit_stays_gathered_after_forward():
    """The loss reads the LM head (root unit) after forward: the outermost unit is told not to reshard, alone.
    torch 2.7's FSDP2 never reshards the root and has no setter; later releases do unless told (Composer passes
    `reshard_after_forward` explicitly), which left the head a DTensor shard in the loss."""
    from torch.distributed.fsdp import FSDPModule

    from flamingo_composer.training.fsdp import keep_root_gathered_after_forward

    calls = []

    class FSDPLinear(FSDPModule, nn.Linear):  # as fully_shard swaps a module's class for FSDP<Module>
        def set_reshard_after_forward(self, reshard_after_forward, recurse=True):
            calls.append((self, reshard_after_forward, recurse))

    root, inner = nn.Linear(2, 2), nn.Linear(2, 2)
    root.inner = inner
    root.__class__ = inner.__class__ = FSDPLinear
    wrapper = nn.Sequential(root)  # the ComposerModel around the sharded Flamingo
    assert keep_root_gathered_after_forward(wrapper)
    assert calls == [(root, False, False)]
    assert not keep_root_gathered_after_forward(nn.Sequential(nn.Linear(2, 2)))  # no FSDP2: nothing to set


@pytest.mark.parametrize(("backend", "fixed"), [("gloo", 2), ("nccl", 0), ("cpu:gloo,cuda:nccl", 0)])
def test_the_gradient_mean_fix_applies_to_gloo_only(monkeypatch, backend, fixed):
    """gloo computes FSDP2's ReduceOp.AVG as a SUM, so each unit's reduced gradient is divided by the world size;
    NCCL averages by itself, and dividing there would shrink every gradient (stand-in process group and units)."""
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import FSDPModule

    from flamingo_composer.training.fsdp import average_fsdp2_gradients_on_gloo

    hooks = []

    class FSDPLinear(FSDPModule, nn.Linear):  # as fully_shard swaps a module's class for FSDP<Module>
        def set_all_reduce_hook(self, hook, *, stream=None):
            hooks.append(hook)

    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch_dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch_dist, "get_world_size", lambda group=None: 4)
    root, inner = nn.Linear(2, 2), nn.Linear(2, 2)
    root.inner = inner
    root.__class__ = inner.__class__ = FSDPLinear
    assert average_fsdp2_gradients_on_gloo(nn.Sequential(root)) == fixed == len(hooks)
    for hook in hooks:
        assert torch.equal(hook(torch.full((3,), 8.0)), torch.full((3,), 2.0))  # the sum of 4 ranks -> their mean
