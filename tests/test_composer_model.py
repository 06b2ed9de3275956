"""FlamingoComposerModel on its own: loss keys and values, empty datasets, bad input, eval metrics, FLOP count."""

from __future__ import annotations

import math

import pytest
import torch
from composer import Trainer
from composer.callbacks import SpeedMonitor
from composer.loggers import InMemoryLogger
from step_utils import (
    dual_batch,
    dual_dataspec,
    peak_cpu_memory,
    reference_batch,
    reference_bundle,
    set_gates,
    step_losses,
    tiny_bundle,
)

from flamingo_composer.flop_formulas import flop_counter
from flamingo_composer.models.factory import build_flamingo
from flamingo_composer.models.lm_adapter import get_decoder_layers
from flamingo_composer.models.tiny import tiny_model_config
from flamingo_composer.training.composer_model import FlamingoComposerModel
from flamingo_composer.training.flops import flamingo_flops_per_batch
from flamingo_composer.training.loss import (
    REQUIRED_TRAINER_KWARGS,
    FinalHidden,
    FrozenHead,
    StepTokenCounts,
    head_cross_entropy_sum,
    install_global_counts,
    token_cross_entropy_sum,
)


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture
def batch(bundle):
    return dual_batch(bundle.tokenizer)


def _hf_loss(flamingo, sub) -> float:
    with torch.no_grad():
        out = flamingo(
            images=sub["images"],
            image_mask=sub["image_mask"],
            input_ids=sub["input_ids"],
            attention_mask=sub["attention_mask"],
            labels=sub["labels"],
        )
    return out.loss.item()


def test_forward_runs_each_dataset_and_loss_is_the_weighted_sum(bundle, batch):
    model = FlamingoComposerModel(bundle.model, {"laion": 0.3, "mmc4": 0.7})
    outputs = model(batch)
    assert list(outputs) == ["laion", "mmc4"]  # the batch's order: LAION first, as the reference
    for name in outputs:  # training: the LM's last hidden states; the loss projects only the supervised positions
        b, length = batch[name]["input_ids"].shape
        assert isinstance(outputs[name], FinalHidden) and outputs[name].hidden.shape == (b, length, 64)
    install_global_counts(batch)
    losses = model.loss(outputs, batch)
    assert set(losses) == {"total", "laion", "mmc4", "z_loss/laion", "z_loss/mmc4"}
    laion, mmc4 = _hf_loss(bundle.model, batch["laion"]), _hf_loss(bundle.model, batch["mmc4"])
    assert losses["laion"].item() == pytest.approx(laion, rel=1e-6)
    assert losses["mmc4"].item() == pytest.approx(mmc4, rel=1e-6)
    assert losses["total"].item() == pytest.approx(0.3 * laion + 0.7 * mmc4, rel=1e-6)


def test_three_named_datasets_give_the_weighted_sum_of_their_token_means(bundle, batch):
    """Any names: each dataset's loss under its name, the total weighted by its multiplier, metrics per name."""
    model = FlamingoComposerModel(bundle.model, {"cc": 0.5, "docs": 1.0, "laion": 0.3})
    named = {"cc": batch["laion"], "docs": batch["mmc4"], "laion": dict(batch["laion"])}
    named["laion"]["labels"] = batch["laion"]["labels"].clone()  # another dataset: other targets (of real tokens,
    named["laion"]["labels"][:, ::2] = -100  # as the loader's labels always are: training runs without the mask)
    losses = step_losses(model, named)
    assert set(losses) == {"total", "cc", "docs", "laion", "z_loss/cc", "z_loss/docs", "z_loss/laion"}
    expected = {name: _hf_loss(bundle.model, sub) for name, sub in named.items()}
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-6), name
    total = 0.5 * expected["cc"] + 1.0 * expected["docs"] + 0.3 * expected["laion"]
    assert losses["total"].item() == pytest.approx(total, rel=1e-6)
    assert {k.split("/")[0] for k in model.get_metrics(is_train=False)} == {"cc", "docs", "laion"}


def test_an_absent_dataset_has_no_loss_key(bundle, batch):
    model = FlamingoComposerModel(bundle.model)
    only_mmc4 = {"mmc4": batch["mmc4"]}
    losses = step_losses(model, only_mmc4)
    assert set(losses) == {"total", "mmc4", "z_loss/mmc4"}
    assert losses["total"].item() == pytest.approx(_hf_loss(bundle.model, batch["mmc4"]), rel=1e-6)


def test_a_dataset_without_supervised_tokens_contributes_exactly_zero(bundle, batch):
    model = FlamingoComposerModel(bundle.model)
    batch["laion"]["labels"] = torch.full_like(batch["laion"]["labels"], -100)
    losses = step_losses(model, batch)
    assert losses["laion"].item() == 0.0
    assert losses["total"].item() == pytest.approx(_hf_loss(bundle.model, batch["mmc4"]), rel=1e-6)
    losses["total"].backward()
    grads = [p.grad for p in bundle.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    bundle.model.zero_grad(set_to_none=True)


def test_bad_batches_fail_with_the_key_named(bundle, batch):
    model = FlamingoComposerModel(bundle.model)
    with pytest.raises(KeyError, match="coco"):
        model({"coco": batch["laion"]})
    with pytest.raises(KeyError, match="no dataset"):
        model({})
    no_ids = {"laion": {k: v for k, v in batch["laion"].items() if k != "input_ids"}}
    with pytest.raises(KeyError, match="input_ids"):
        model(no_ids)
    outputs = model(batch)
    with pytest.raises(KeyError, match="global_supervised_tokens.*StepTokenCounts"):
        model.loss(outputs, batch)  # no step counts: a Trainer without the callback


def test_the_model_is_the_single_child():
    # Under FSDP1 Composer wraps and clips each direct child separately: one child makes the clip global.
    bundle = tiny_bundle()
    model = FlamingoComposerModel(bundle.model)
    assert [name for name, _ in model.named_children()] == ["model"]
    assert REQUIRED_TRAINER_KWARGS == {"accumulate_train_batch_on_tokens": True}


def test_eval_metrics_per_dataset(bundle, batch):
    model = FlamingoComposerModel(bundle.model)
    assert model.get_metrics(is_train=True) == {}
    metrics = model.get_metrics(is_train=False)
    assert set(metrics) == {
        "laion/LanguageCrossEntropy",
        "laion/TokenAccuracy",
        "mmc4/LanguageCrossEntropy",
        "mmc4/TokenAccuracy",
    }
    model.eval()
    with torch.no_grad():
        outputs = model.eval_forward(batch)
        laion_only = {"laion": batch["laion"]}
        laion_outputs = model.eval_forward(laion_only)
    for metric in metrics.values():
        model.update_metric(batch, outputs, metric)
        model.update_metric(laion_only, laion_outputs, metric)  # a LAION-only evaluator batch
    model.train()
    for name in ("laion", "mmc4"):
        logits, labels = outputs[name], batch[name]["labels"]
        target = labels[:, 1:]
        supervised = target != -100
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1][supervised], target[supervised], reduction="sum"
        )
        correct = (logits[:, :-1].argmax(-1) == target)[supervised].sum()
        count = supervised.sum()
        repeats = 2 if name == "laion" else 1  # the LAION batch was seen twice, MMC4 once
        assert metrics[f"{name}/LanguageCrossEntropy"].compute().item() == pytest.approx(
            (ce / count).item(), rel=1e-5
        )
        assert metrics[f"{name}/TokenAccuracy"].compute().item() == pytest.approx((correct / count).item())
        assert metrics[f"{name}/TokenAccuracy"].total.item() == repeats * count.item()


# -------------------------------------------------------------------------------------------------- FLOPs

FLOP_CASES = {  # which -> (LM family, tiny vision tower, overrides)
    "gpt_neox": ("gpt_neox", "tiny-vit", {}),
    "gpt2": ("gpt2", "tiny-vit", {}),  # Conv1D layers
    "mpt": ("mpt", "tiny-vit", {}),  # tied head
    "llama": ("llama", "tiny-vit", {}),
    "per_image": ("gpt_neox", "tiny-vit", {"cross_attention": "per_image"}),
    "mixtral": ("mixtral", "tiny-vit", {}),  # MoE: 2 of 4 experts per token
    "qwen3_moe": ("qwen3_moe", "tiny-vit", {}),
    "timm_siglip2": ("qwen3", "tiny-siglip2", {}),  # an open_clip timm tower
    "hf_siglip": ("gemma3_text", "tiny-hf-siglip", {}),  # a transformers vision model
    "reference": None,
}


@pytest.mark.parametrize("which", list(FLOP_CASES))
def test_frozen_aware_flops_match_the_flops_a_step_executes(which):
    """The estimate equals the matmul FLOPs torch counts in one forward + backward of each dataset.

    Autograd skips weight gradients of frozen parameters and the vision tower runs without autograd, so the
    executed count is itself frozen-aware; empty MMC4 image slots are neither encoded nor resampled. The MoE
    families dispatch each token to its top-k experts only, so the executed count is the active experts'.
    """
    if which != "reference":  # a tiny LM of that family with a tiny tower of that kind
        family, vision, overrides = FLOP_CASES[which]
        bundle = build_flamingo(tiny_model_config(family, vision=vision, **overrides))
        batch = dual_batch(bundle.tokenizer)
    else:
        bundle = reference_bundle()
        batch = reference_batch()
    assert not batch["mmc4"]["image_mask"].all()  # some empty slots
    model = FlamingoComposerModel(bundle.model)
    estimate = flamingo_flops_per_batch(bundle.model, batch)
    assert set(estimate) == {"laion", "mmc4"}
    for name in ("laion", "mmc4"):
        sub = {name: batch[name]}
        with flop_counter() as counter:
            step_losses(model, sub)["total"].backward()
        assert estimate[name] == pytest.approx(counter.get_total_flops(), rel=1e-3), name
    assert model.flops_per_batch(batch) == pytest.approx(sum(estimate.values()))


def test_an_moe_layer_counts_its_active_experts_only():
    from flamingo_composer.training.flops import matmul_weights

    bundle = build_flamingo(tiny_model_config("mixtral"))
    layer = get_decoder_layers(bundle.model.lang_encoder)[0].decoder_layer
    experts = layer.block_sparse_moe.experts  # 4 experts, 2 per token
    per_expert = matmul_weights(experts[0])
    assert matmul_weights(layer, experts_per_token=2) == pytest.approx(matmul_weights(layer) - 2 * per_expert)


def test_speed_monitor_reports_flops(bundle):
    batches = [dual_batch(bundle.tokenizer, seed=s) for s in range(3)]
    logger = InMemoryLogger()
    model = FlamingoComposerModel(bundle.model)
    trainer = Trainer(
        model=model,
        train_dataloader=dual_dataspec(batches),
        max_duration="3ba",
        loggers=[logger],
        callbacks=[StepTokenCounts(), SpeedMonitor(window_size=1)],
        device="cpu",
        precision="fp32",
        progress_bar=False,
        optimizers=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        **REQUIRED_TRAINER_KWARGS,
    )
    trainer.fit()
    trainer.close()
    flops_per_sec = logger.get_timeseries("throughput/flops_per_sec")["throughput/flops_per_sec"]
    assert len(flops_per_sec) >= 1 and all(math.isfinite(v) and v > 0 for v in flops_per_sec)


def test_bench_prints_one_json_line_of_figures(tmp_path_factory, capsys):
    """benchmarks/bench.py through the real entry point (tiny run.yaml model plus a third named dataset, in-memory
    batches, 2 timed steps): samples/s of every dataset by its name."""
    import json

    from train_helpers import RUN_YAML, THIRD, small_data, third_dataset_overrides

    from benchmarks import bench
    data_root = small_data(tmp_path_factory)
    argv = ["--config", str(RUN_YAML), "--steps", "2", "--warmup", "1", "--matmul-size", "256",
            f"variables.data_root={data_root}", "data.laion.batch_size=4", "data.mmc4.batch_size=2",
            *third_dataset_overrides(data_root, batch_size=4)]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["steps"] == 2 and figures["data"] == "memory"
    rates = [figures[f"{name}_samples_per_s"] for name in ("laion", "mmc4", THIRD)]
    assert rates == pytest.approx([2 * rates[1], rates[1], 2 * rates[1]])  # 4, 2 and 4 per step
    assert figures["samples_per_s"] == pytest.approx(sum(rates))
    for key in (
        "step_time_s",
        "tokens_per_s",
        "achieved_flops_per_s",
        "matmul_flops_per_s",
        "peak_memory_bytes",
    ):
        assert figures[key] > 0, key
    assert figures["achieved_over_matmul"] == pytest.approx(
        figures["achieved_flops_per_s"] / figures["matmul_flops_per_s"]
    )
    # Tensors only (weights, AdamW state, one step's activations): more than the weights, less than the RSS,
    # which also holds the libraries.
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.training.config import load_config

    model = build_flamingo(load_config(RUN_YAML, [f"variables.data_root={data_root}"]).model).model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < figures["peak_tensor_bytes"] < figures["peak_memory_bytes"]


def test_resident_tensor_bytes_count_each_storage_once():
    from benchmarks import bench

    layer = torch.nn.Linear(8, 4)
    layer.bias = torch.nn.Parameter(layer.weight[0, :4].detach())  # shares the weight's storage
    optimizer = torch.optim.AdamW(layer.parameters())
    assert bench.resident_tensor_bytes(layer, optimizer) == 32 * 4  # the weight's storage, once
    layer(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # exp_avg and exp_avg_sq of both (8x4 and 4) + two 0-d step counters, not the gradients
    assert bench.resident_tensor_bytes(layer, optimizer) == (32 + 2 * (32 + 4)) * 4 + 2 * 4


def test_step_tensor_peak_counts_frees_where_they_happen():
    """Frees made in Python code inside a profiler range (Composer's closure step holds the whole forward and
    backward in `Optimizer.step`) lower the running sum when they happen, not at the range's start."""
    from benchmarks import bench


    def step():
        with torch.profiler.record_function("outer"):
            first = torch.ones(1024, 256)  # 1 MiB
            second = first * 2  # 2 MiB live
            del first, second
            torch.ones(512, 256)  # 0.5 MiB, after both are freed

    assert bench.step_tensor_peak(step) == pytest.approx(2 * 2**20, abs=4096)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "mpt", "opt", "gpt2", "gptj"])
def test_output_head_of_the_final_hidden_states_gives_the_logits(family):
    """The loss's path (last hidden states, then the head at supervised positions) computes forward's logits."""
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    bundle = build_flamingo(tiny_model_config(family))
    set_gates(bundle.model, 0.5)
    bundle.model.eval()  # GPT-2 and OPT configs have dropout: compare deterministic forwards
    sub = dual_batch(bundle.tokenizer)["mmc4"]
    inputs = {k: sub[k] for k in ("images", "image_mask", "input_ids", "attention_mask")}
    with torch.no_grad():
        logits = bundle.model(**inputs).logits  # (B, L, V)
        hidden = bundle.model(**inputs, final_hidden_states=True)  # (B, L, D)
        torch.testing.assert_close(bundle.model.output_head(hidden), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [None, 1, 7, 4096])
def test_chunked_head_cross_entropy_equals_cross_entropy_in_value_and_gradient(chunk_tokens):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)  # (B, L, D)
    labels = torch.randint(0, 50, (3, 9))
    labels[0] = -100  # a row with no supervised token
    labels[1, :5] = -100
    expected = torch.nn.functional.cross_entropy(
        head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    want = torch.autograd.grad(expected, [hidden, head.weight])
    total = head_cross_entropy_sum(hidden, labels, head, chunk_tokens)
    got = torch.autograd.grad(total, [hidden, head.weight])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # The logits path shifts the labels, not the logits: same value.
    assert token_cross_entropy_sum(head(hidden), labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # Nothing supervised: exactly 0, with the graph kept (every rank's backward reaches the same parameters).
    none = head_cross_entropy_sum(hidden, torch.full_like(labels, -100), head, chunk_tokens)
    assert none.item() == 0.0 and none.requires_grad


def test_the_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    """Peak memory of the loss's forward + backward: bounded by a chunk's (n, V) logits, not all N positions'."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 20_000, bias=False)
    hidden = torch.randn(4, 256, 32, requires_grad=True)  # 1,020 supervised positions
    labels = torch.randint(0, 20_000, (4, 256))
    full_logits = 4 * 255 * 20_000 * 4  # bytes of all positions' fp32 logits (82 MB)

    def step(chunk_tokens):
        return lambda: head_cross_entropy_sum(hidden, labels, head, chunk_tokens).backward()

    whole, chunked = peak_cpu_memory(step(None)), peak_cpu_memory(step(128))
    assert whole > full_logits  # logits, and their gradient, alive at once
    # This head trains, so each chunk's logits are recomputed in backward: the logits, their log-softmax and its
    # gradient, 128 positions' each, live at once.
    chunk_logits = 128 * 20_000 * 4
    assert chunked < 4 * chunk_logits, (chunked, whole)


def _frozen_heads(dim: int, vocab: int, dtype) -> dict:
    """The frozen-head kinds of `LinearCrossEntropySum`: untied Linear (with and without bias), a tied head (with a
    frozen bias of its own, as CTRL's)."""
    from flamingo_composer.models.embeddings import SplicedEmbedding, SplicedLMHead

    linear = torch.nn.Linear(dim, vocab, dtype=dtype).requires_grad_(False)
    no_bias = torch.nn.Linear(dim, vocab, bias=False, dtype=dtype).requires_grad_(False)
    tied = SplicedEmbedding(torch.randn(vocab, dim, dtype=dtype), new_token_ids=[3, vocab - 1])
    tied.weight.requires_grad_(False)
    bias = torch.nn.Parameter(torch.randn(vocab, dtype=dtype), requires_grad=False)
    return {"linear": linear, "linear_no_bias": no_bias, "tied": SplicedLMHead(tied),
            "tied_bias": SplicedLMHead(tied, bias)}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "tied", "tied_bias"])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 7])
def test_frozen_head_cross_entropy_takes_its_gradient_in_forward_and_equals_cross_entropy(kind, chunk_tokens, dtype):
    """The fused path (a frozen head, the default case): value and gradients of hidden and of the trained
    new-token rows equal autograd's through F.cross_entropy, rows without supervised tokens included."""
    torch.manual_seed(0)
    head = _frozen_heads(16, 50, dtype)[kind]
    assert FrozenHead.of(head) is not None  # this is the fused path, not the checkpointed one
    hidden = torch.randn(3, 9, 16, dtype=dtype, requires_grad=True)  # (B, L, D)
    labels = torch.randint(0, 50, (3, 9))
    labels[0] = -100  # a row with no supervised token
    labels[1, :5] = -100
    labels[2, 4] = 3  # a new token as target: its column comes from the trained rows
    trained = [head._embedding.new_token_rows] if kind.startswith("tied") else []
    expected = 0.5 * torch.nn.functional.cross_entropy(
        head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )  # a scale, so backward's use of the incoming gradient is checked too
    want = torch.autograd.grad(expected, [hidden, *trained])
    total = 0.5 * head_cross_entropy_sum(hidden, labels, head, chunk_tokens)
    got = torch.autograd.grad(total, [hidden, *trained])
    tolerance = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(total, expected, **tolerance)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    none = head_cross_entropy_sum(hidden, torch.full_like(labels, -100), head, chunk_tokens)
    assert none.item() == 0.0 and none.requires_grad


LOGIT_STEPS = {  # the LMs' own logit steps (models/logits.py)
    "gemma2_softcap": (("softcap", 3.0),),
    "granite_scaling": (("div", 4.0),),
    "cohere_scale": (("mul", 0.25),),
    "scale_then_softcap": (("div", 2.0), ("mul", 3.0), ("softcap", 5.0)),
}


@pytest.mark.parametrize("steps", list(LOGIT_STEPS))
@pytest.mark.parametrize("kind", ["linear", "tied_bias"])
def test_the_fused_cross_entropy_applies_the_lm_logit_steps_in_value_and_gradient(kind, steps):
    """Value and gradients equal autograd's through the LM's own logits = steps(head(hidden)), in float64."""
    from flamingo_composer.models.logits import LogitTransform

    torch.manual_seed(1)
    transform = LogitTransform(LOGIT_STEPS[steps])
    head = _frozen_heads(16, 50, torch.float64)[kind]
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True) * 3  # logits beyond the soft-cap
    labels = torch.randint(0, 50, (3, 9))
    labels[2, 4] = 3  # a new token's column
    trained = [head._embedding.new_token_rows] if kind.startswith("tied") else []
    logits = transform.apply(head(hidden))  # (B, L, V)
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), targets, reduction="sum")
    want = torch.autograd.grad(expected, [hidden, *trained])
    total = head_cross_entropy_sum(hidden, labels, head, 7, transform)
    got = torch.autograd.grad(total, [hidden, *trained])
    torch.testing.assert_close(total, expected, atol=1e-12, rtol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    plain = head_cross_entropy_sum(hidden, labels, head, 7)
    assert (plain - total).abs() > 1e-3  # the steps matter on this input


def test_a_trainable_head_is_not_fused():
    assert FrozenHead.of(torch.nn.Linear(4, 8)) is None  # its weight's gradient needs the checkpointed path
    tied = _frozen_heads(4, 8, torch.float32)["tied"]
    tied._embedding.weight.requires_grad_(True)
    assert FrozenHead.of(tied) is None


def test_no_logits_outlive_the_forward_of_the_frozen_head_loss():
    """What the loss's graph keeps for backward: (N, D) gradients, never an (n, V) tensor of logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 20_000, bias=False).requires_grad_(False)
    hidden = torch.randn(4, 256, 32, requires_grad=True)  # 1,020 supervised positions
    labels = torch.randint(0, 20_000, (4, 256))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        total = head_cross_entropy_sum(hidden, labels, head, chunk_tokens=256)
    assert max(saved) < 20_000 * 8, saved  # no saved tensor as large as 8 positions' logits
    assert sum(saved) < 2 * hidden.numel(), saved
    total.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_per_image_cross_attention_model_equals_the_masked_model():
    from flamingo_composer.models.cross_attention import MaskedCrossAttention
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.tiny import tiny_model_config

    models = [build_flamingo(tiny_model_config("llama", cross_attention=form)) for form in ("masked", "per_image")]
    for bundle, per_image in zip(models, (False, True)):
        set_gates(bundle.model, 0.5)
        forms = {m.per_image for m in bundle.model.modules() if isinstance(m, MaskedCrossAttention)}
        assert forms == {per_image}  # every block built in the configured form
    sub = dual_batch(models[0].tokenizer)["mmc4"]
    inputs = {k: sub[k] for k in ("images", "image_mask", "input_ids", "attention_mask")}
    with torch.no_grad():
        masked, per_image = (bundle.model(**inputs).logits for bundle in models)
    torch.testing.assert_close(per_image, masked, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the images matter to these logits (the comparison is not of image-blind outputs)
        other = models[1].model(**{**inputs, "images": inputs["images"].flip(0)}).logits
    assert (other - per_image).abs().max() > 1e-3


def test_compile_trainable_compiles_the_perceiver_and_every_block_in_place():
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock
    from flamingo_composer.training.run import compile_trainable_modules

    flamingo = tiny_bundle().model
    names_before = [n for n, _ in flamingo.named_parameters()]
    blocks = [m for m in flamingo.modules() if isinstance(m, GatedCrossAttentionBlock)]
    assert compile_trainable_modules(flamingo) == 1 + len(blocks) == 3
    assert all(m._compiled_call_impl is not None for m in [flamingo.perceiver, *blocks])
    assert flamingo.lang_encoder._compiled_call_impl is None  # the frozen LM stays eager
    assert [n for n, _ in flamingo.named_parameters()] == names_before  # checkpoint keys unchanged


def test_per_dataset_backward_peaks_below_one_backward_over_both_datasets(bundle):
    """The step's shape (per-dataset backward): each microbatch holds one dataset, so one dataset's
    activations are alive at a time; one forward over LAION and MMC4 then one backward holds both."""
    from flamingo_composer.data.dataspec import _trim_padding, split_batch

    model = FlamingoComposerModel(bundle.model)
    batch = dual_batch(bundle.tokenizer, laion_rows=8, mmc4_rows=4, laion_len=32, mmc4_len=96)
    batch = {name: _trim_padding(dict(sub)) for name, sub in batch.items()}  # as the microbatches: same widths
    for p in model.parameters():  # gradients allocated up front: both steps then differ only in activations
        if p.requires_grad:
            p.grad = torch.zeros_like(p)

    install_global_counts(batch)  # the step's counts, as the Trainer's callback puts them before the split

    def one_backward():
        model.loss(model(batch), batch)["total"].backward()

    def per_dataset_backward():
        parts = split_batch(batch, microbatch_size=8)  # MMC4's 4 rows, then LAION's 8 (one dataset each)
        assert [sorted(p) for p in parts] == [["mmc4"], ["laion"]]
        for part in parts:
            model.loss(model(part), part)["total"].backward()

    def one_part(index):
        part = split_batch(batch, microbatch_size=8)[index]
        return lambda: model.loss(model(part), part)["total"].backward()

    both, separate = peak_cpu_memory(one_backward), peak_cpu_memory(per_dataset_backward)
    mmc4, laion = peak_cpu_memory(one_part(0)), peak_cpu_memory(one_part(1))
    print(f"peak step memory: one backward {both / 1e6:.1f} MB, per dataset {separate / 1e6:.1f} MB "
          f"(LAION part {laion / 1e6:.1f}, MMC4 part {mmc4 / 1e6:.1f})")
    assert separate < both
    assert separate <= 1.1 * max(laion, mmc4)  # the larger part's peak, not the sum
    assert both > laion + 0.5 * mmc4  # one backward holds both datasets' activations


def test_the_larger_dataset_runs_first_while_no_gradient_exists(bundle):
    """The first backward of a step allocates the trainable gradients (Composer sets them to None before each
    batch). MMC4's microbatch, the larger graph, goes first: its activations are never alive together with a
    full set of gradients, so the step peaks lower than in the LAION-first order, with the same gradients."""
    from flamingo_composer.data.dataspec import split_batch

    model = FlamingoComposerModel(bundle.model)
    set_gates(bundle.model, 0.5)
    # Long documents, short captions: MMC4's activations are several times the gradients (as at every real size).
    batch = dual_batch(bundle.tokenizer, laion_rows=2, mmc4_rows=8, laion_len=16, mmc4_len=256)
    install_global_counts(batch)
    parts = split_batch(batch, microbatch_size=2)
    assert [sorted(p) for p in parts] == [["mmc4"], ["laion"]]
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(order):
        for part in order:
            model.loss(model(part), part)["total"].backward()

    peaks, grads = {}, {}
    for name, order in (("mmc4_first", parts), ("laion_first", parts[::-1])):
        for _ in range(2):  # the first run builds lazy caches (rotary tables), which would count as the step's
            for p in trainable:
                p.grad = None  # outside the measured step, as Composer's zero_grad before the batch
            peaks[name] = peak_cpu_memory(lambda order=order: step(order))
        grads[name] = [p.grad.clone() for p in trainable]
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
    print(f"step peak: MMC4 first {peaks['mmc4_first'] / 1e6:.2f} MB, LAION first {peaks['laion_first'] / 1e6:.2f} "
          f"MB, gradients {gradient_bytes / 1e6:.2f} MB")
    assert peaks["mmc4_first"] < peaks["laion_first"] - 0.5 * gradient_bytes
    for a, b in zip(grads["mmc4_first"], grads["laion_first"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # a + b == b + a: the same gradients, bit for bit
