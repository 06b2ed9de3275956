"""Config validation: every mistake stops the run at load time with the dotted key or the path named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flamingo_composer.training.config import ConfigError, TrainConfig, config_from_dict, load_config
from flamingo_composer.training.fsdp import FSDPSettings


@pytest.fixture
def shards(tmp_path: Path) -> dict[str, str]:
    """Two existing (empty) local shard files; config loading only checks that they exist."""
    paths = {}
    for name in ("laion", "mmc4"):
        for i in range(2):
            (tmp_path / f"{name}-{i}.tar").write_bytes(b"")
        paths[name] = str(tmp_path / f"{name}-{{0..1}}.tar")
    return paths


def base_config(shards: dict[str, str]) -> dict:
    return {
        "variables": {"lr": 2.0e-3, "run": "unit"},
        "run_name": "${variables.run}",
        "model": {
            "vision": {"custom_config": {"vision_cfg": {"width": 64, "layers": 2, "image_size": 32, "patch_size": 16}}},
            "lm": {"config": {"model_type": "gpt_neox", "hidden_size": 32}},
            "tokenizer": {"builtin": "tiny"},
        },
        "data": {
            "laion": {"shards": shards["laion"], "batch_size": 4},
            "mmc4": {"shards": shards["mmc4"], "batch_size": 2},
        },
        "max_duration": "10ba",
        "optimizer": {"lr": "${variables.lr}"},
        "device": "cpu",
    }


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # config order: the order of `data:` matters
    return path


def load_error(tmp_path: Path, data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data), overrides or [])
    return str(info.value)


def test_valid_config_with_overrides_and_interpolation(tmp_path, shards):
    cfg = load_config(
        write_yaml(tmp_path, base_config(shards)),
        ["variables.lr=0.5", "scheduler.t_warmup=3", "data.mmc4.batch_size=1", "loggers.inmemory={}"],
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.run_name == "unit"
    assert cfg.optimizer.lr == 0.5  # the override reached the interpolated value
    assert cfg.optimizer.betas == (0.9, 0.999) and isinstance(cfg.optimizer.betas, tuple)
    assert cfg.scheduler.t_warmup == "3ba" and cfg.max_duration == "10ba"
    assert cfg.data["mmc4"].batch_size == 1 and cfg.data["laion"].batch_size == 4
    assert cfg.model.tokenizer.builtin == "tiny"
    assert cfg.algorithms == {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}
    assert cfg.loggers == {"inmemory": {}}


@pytest.mark.parametrize(
    ("section", "bad_key", "named"),
    [
        (None, "optimzer", "'optimzer' (did you mean 'optimizer'?)"),
        ("fsdp_config", "cpu_offload", "'fsdp_config.cpu_offload'"),
        ("data.laion", "shard", "'data.laion.shard'"),
        ("data.mmc4.preprocess", "max_tokenz", "'data.mmc4.preprocess.max_tokenz'"),
        ("model.lm", "nme", "'model.lm.nme'"),
        ("optimizer", "momentum", "'optimizer.momentum'"),
    ],
)
def test_unknown_key_anywhere_is_named(tmp_path, shards, section, bad_key, named):
    data = base_config(shards)
    if section == "fsdp_config":
        data["fsdp_config"] = {}
    target = data
    for part in (section.split(".") if section else []):
        target = target.setdefault(part, {})
    target[bad_key] = 1
    message = load_error(tmp_path, data)
    assert f"unknown key {named}" in message


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.lr=fast", "optimizer.lr: expected float, got str 'fast'"),
        ("seed=1.5", "seed: expected int"),
        ("optimizer.betas=[0.9,0.99,0.5]", "optimizer.betas: expected a list of 2 values"),
        ("max_duration=2ep", "max_duration: '2ep' must be counted in batches"),
        ("precision=bf16", "precision: must be one of ['fp32', 'amp_bf16', 'amp_fp16']"),
        ("data.laion.batch_size=many", "data.laion.batch_size: expected int"),
        ("progress_bar=3", "progress_bar: expected bool"),
        ("device_train_microbatch_size=half", "device_train_microbatch_size: expected int | 'auto' | null"),
        ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
    ],
)
def test_wrong_type_or_value_is_named(tmp_path, shards, override, named):
    assert named in load_error(tmp_path, base_config(shards), [override])


def test_missing_shard_path_is_named(tmp_path, shards):
    data = base_config(shards)
    data["data"]["mmc4"]["shards"] = str(tmp_path / "nowhere-{0..2}.tar")
    message = load_error(tmp_path, data)
    assert "data.mmc4.shards" in message and str(tmp_path / "nowhere-0.tar") in message


def test_keys_of_the_other_format_are_errors_not_ignored(tmp_path_factory):
    """`data.laion.shards` on an MDS recipe used to be dropped silently (the run trained on the MDS data)."""
    from train_helpers import small_data

    root = small_data(tmp_path_factory)
    with pytest.raises(ConfigError, match=r"data\.laion\.shards: applies to format 'wds' only.*format 'mds'"):
        _recipe("run.yaml", [f"variables.data_root={root}", f"data.laion.shards={root}/wds/laion"])
    with pytest.raises(ConfigError, match=r"data\.mmc4\.shuffle_block_size: applies to format 'mds' only"):
        _recipe("run.yaml", [f"variables.data_root={root}", "data.mmc4.format=wds", "data.mmc4.local=null",
                             "data.mmc4.split=null", f"data.mmc4.shards={root}/wds/mmc4",
                             "data.mmc4.shuffle_block_size=64"])  # fmt: skip
    switched = _recipe("run.yaml", [f"variables.data_root={root}", "data.laion.format=wds", "data.laion.local=null",
                                    "data.laion.split=null", f"data.laion.shards={root}/wds/laion"])  # fmt: skip
    assert switched.data["laion"].shard_urls() == sorted(str(p) for p in (root / "wds" / "laion").glob("*.tar"))


def test_missing_reference_checkpoint_is_named(tmp_path, shards):
    message = load_error(tmp_path, base_config(shards), [f"load_reference_checkpoint={tmp_path}/of3b/checkpoint.pt"])
    assert "load_reference_checkpoint" in message and "of3b/checkpoint.pt" in message


def test_fsdp_use_orig_params_false_rejected_with_reason(tmp_path, shards):
    data = base_config(shards)
    data["fsdp_config"] = {"version": 1, "use_orig_params": False}
    message = load_error(tmp_path, data)
    assert message.startswith("fsdp_config.use_orig_params:")
    assert "partly frozen" in message and "decay groups" in message


def test_fsdp1_settings_pass_composer_keys_and_hybrid_shard():
    settings = FSDPSettings(version=1, sharding_strategy="HYBRID_SHARD", data_parallel_replicate_degree=2,
                            mixed_precision="PURE")  # fmt: skip
    composer_kwargs = settings.to_composer()["fsdp"]
    assert composer_kwargs["sharding_strategy"] == "HYBRID_SHARD"
    assert composer_kwargs["activation_checkpointing_reentrant"] is False
    from composer.utils import FSDPConfig

    known = {f for f in FSDPConfig.__dataclass_fields__}
    assert set(composer_kwargs) <= known  # every key we pass means something to Composer


def test_fsdp2_settings_become_an_fsdp2_config():
    from composer.utils import FSDP2Config

    full = FSDPSettings(activation_checkpointing=True, state_dict_type="full").to_composer()["fsdp"]
    assert isinstance(full, FSDP2Config)
    assert (full.reshard_after_forward, full.activation_checkpointing, full.state_dict_type) == (True, True, "full")
    assert FSDPSettings(sharding_strategy="SHARD_GRAD_OP").to_composer()["fsdp"].reshard_after_forward is False
    explicit = FSDPSettings(sharding_strategy="SHARD_GRAD_OP", reshard_after_forward=True, mixed_precision="PURE")
    assert explicit.to_composer()["fsdp"].reshard_after_forward is True
    assert explicit.to_composer()["fsdp"].mixed_precision == "PURE"
    for bad, named in (({"use_orig_params": True, "limit_all_gathers": False}, "limit_all_gathers: applies to FSDP "
                        "version 1 only"), ({"sharding_strategy": "NO_SHARD"}, "NO_SHARD has no FSDP2 form"),
                       ({"version": 1, "reshard_after_forward": False}, "reshard_after_forward: applies to FSDP "
                        "version 2 only"), ({"sharding_strategy": "HYBRID_SHARD"}, "data_parallel_shard_degree")):
        with pytest.raises(ValueError, match=named):
            FSDPSettings(**bad)


def test_cross_field_checks(tmp_path, shards):
    data = base_config(shards)
    assert "autoresume: true needs both run_name and save_folder" in load_error(tmp_path, data, ["autoresume=true"])
    assert "precision: amp_bf16 needs a GPU" in load_error(tmp_path, data, ["precision=amp_bf16"])
    assert "'auto' needs a GPU" in load_error(tmp_path, data, ["device_train_microbatch_size=auto"])
    data["fsdp_config"] = {"version": 1}
    assert "fsdp_config.version: FSDP1 needs GPUs" in load_error(tmp_path, data)
    data["fsdp_config"] = {"version": 2}
    assert "'auto' needs FSDP1" in load_error(tmp_path, data, ["device=gpu", "device_train_microbatch_size=auto"])
    data["fsdp_config"] = {}  # FSDP2 (the default version) runs on CPU
    assert load_config(write_yaml(tmp_path, data)).fsdp_config.version == 2


def test_component_names_and_kwargs_checked_against_registries(tmp_path, shards):
    message = load_error(tmp_path, base_config(shards), ["loggers.tensorbored={}"])
    assert "loggers.tensorbored: unknown name 'tensorbored'" in message and "'wandb'" in message
    message = load_error(tmp_path, base_config(shards), ["loggers.wandb.projekt=x"])
    assert "unknown key 'loggers.wandb.projekt'" in message
    message = load_error(tmp_path, base_config(shards), ["algorithms.gradient_clipping.clip=1"])
    assert "algorithms.gradient_clipping.clip" in message
    message = load_error(tmp_path, base_config(shards), ["callbacks.speed_monitor.window=3"])
    assert "callbacks.speed_monitor.window" in message
    assert "optimizer.name: unknown name 'lion'" in load_error(tmp_path, base_config(shards), ["optimizer.name=lion"])
    cfg = load_config(write_yaml(tmp_path, base_config(shards)), ["algorithms.ema={half_life: 10ba}"])
    assert "ema" in cfg.algorithms  # any composer algorithm by its name


def test_interpolation_error_and_bad_override_syntax(tmp_path, shards):
    data = base_config(shards)
    data["seed"] = "${variables.nope}"
    assert "variables.nope" in load_error(tmp_path, data)
    assert "dotted.key=value" in load_error(tmp_path, base_config(shards), ["max_duration"])


def test_missing_required_section(shards):
    data = base_config(shards)
    del data["model"]
    del data["variables"]
    data["run_name"] = "x"
    data["optimizer"] = {}
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        config_from_dict(data)


def _recipe(name: str, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(Path(__file__).resolve().parent.parent / "yamls" / name, overrides or [])


@pytest.mark.parametrize(
    ("name", "lm", "every", "gpus"),
    [
        ("openflamingo-3b.yaml", "anas-awadalla/mpt-1b-redpajama-200b", 1, 8),
        ("openflamingo-4b.yaml", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, 8),
        ("openflamingo-9b.yaml", "anas-awadalla/mpt-7b", 4, 64),
    ],
)
def test_released_model_recipes(name, lm, every, gpus):
    """SPEC 3 and the released-model table; max_duration = 60M MMC4 + 120M LAION samples at the stated GPU count."""
    cfg = _recipe(name)
    assert (cfg.model.lm.name, cfg.model.tokenizer.name, cfg.model.cross_attn_every_n_layers) == (lm, lm, every)
    assert (cfg.model.vision.name, cfg.model.vision.pretrained) == ("ViT-L-14", "openai")
    assert cfg.model.lm.trust_remote_code and cfg.model.tokenizer.trust_remote_code  # as the reference loads them
    assert cfg.variables["num_gpus"] == gpus
    assert (cfg.data["laion"].batch_size, cfg.data["mmc4"].batch_size) == (64, 32)
    steps = int(cfg.max_duration.removesuffix("ba"))
    assert steps == -(-60_000_000 // (32 * gpus)) == -(-120_000_000 // (64 * gpus))
    assert (cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.eps, cfg.optimizer.weight_decay) == (
        1e-4, (0.9, 0.999), 1e-8, 0.1
    )
    assert (cfg.scheduler.name, cfg.scheduler.t_warmup) == ("constant_with_warmup", "1875ba")
    assert cfg.data.loss_multipliers() == {"laion": 0.2, "mmc4": 1.0}
    assert cfg.data["mmc4"].preprocess.sim_threshold == 0.24
    assert cfg.precision == "amp_bf16" and cfg.fsdp_config is not None and cfg.fsdp_config.activation_checkpointing
    assert cfg.algorithms["gradient_clipping"] == {"clipping_type": "norm", "clipping_threshold": 1.0}
    assert "wandb" in cfg.loggers and cfg.autoresume and cfg.save_folder


def test_gpu_smoke_and_main_recipes_validate(tmp_path_factory):
    from train_helpers import small_data

    root = small_data(tmp_path_factory)
    smoke = _recipe("gpu-smoke.yaml", [f"variables.data_root={root}"])
    assert smoke.model.vision.pretrained is None and smoke.model.lm.config["d_model"] == 2048
    assert smoke.precision == "amp_bf16" and smoke.fsdp_config is not None
    assert isinstance(smoke.device_train_microbatch_size, int)
    main = _recipe("run.yaml", [f"variables.data_root={root}"])
    assert main.device == "cpu" and main.precision == "fp32" and main.fsdp_config is None
    assert main.data["laion"].enabled and main.data["mmc4"].enabled and "file" in main.loggers
    assert main.data.forward_order() == ["mmc4", "laion"]  # MMC4's microbatches first, as before
    assert main.eval_loader["mmc4"].preprocess == main.data["mmc4"].preprocess  # inherited, not repeated


def test_microbatch_size_checked_against_every_batch_size(tmp_path, shards):
    data = base_config(shards)  # LAION 4, MMC4 2 per rank
    assert load_config(write_yaml(tmp_path, data), ["device_train_microbatch_size=2"]).device_train_microbatch_size == 2
    message = load_error(tmp_path, data, ["device_train_microbatch_size=3"])
    assert message.startswith("device_train_microbatch_size: 3 does not cut data.laion.batch_size=4")
    message = load_error(tmp_path, data, ["device_train_microbatch_size=1"])  # 4 chunks cannot cut MMC4's 2
    assert "data.mmc4.batch_size=2 cannot be cut into the 4 equal chunks" in message
    data["data"]["docs"] = {"kind": "interleaved", "shards": shards["mmc4"], "batch_size": 3}
    message = load_error(tmp_path, data, ["device_train_microbatch_size=2"])  # 2 chunks: 2 and 1 MMC4, not 1.5
    assert "data.docs.batch_size=3 cannot be cut into the 2 equal chunks" in message


def test_named_datasets_of_a_kind(tmp_path, shards):
    """Any names, each of a kind; laion and mmc4 default their kind; batch size and multiplier default by kind."""
    data = base_config(shards)
    data["data"] = {
        "cc": {"kind": "pairs", "shards": shards["laion"], "loss_multiplier": 0.5},
        "docs": {"kind": "interleaved", "shards": shards["mmc4"], "preprocess": {"max_tokens": 64}},
        **data["data"],
    }
    cfg = load_config(write_yaml(tmp_path, data))
    assert list(cfg.data) == ["cc", "docs", "laion", "mmc4"] and cfg.data.lead == "cc"
    assert {name: d.kind for name, d in cfg.data.items()} == {
        "cc": "pairs", "docs": "interleaved", "laion": "pairs", "mmc4": "interleaved"
    }
    assert cfg.data.loss_multipliers() == {"cc": 0.5, "docs": 1.0, "laion": 0.2, "mmc4": 1.0}  # kinds' defaults
    assert cfg.data.batch_sizes() == {"cc": 16, "docs": 8, "laion": 4, "mmc4": 2}
    assert cfg.data.forward_order() == ["docs", "mmc4", "cc", "laion"]  # interleaved kinds first, then config order
    assert cfg.data["docs"].preprocess.max_tokens == 64 and cfg.data["mmc4"].preprocess.max_tokens == 256
    removed = load_config(write_yaml(tmp_path, data), ["data.cc=null"])  # NAME: null removes a base's entry
    assert list(removed.data) == ["docs", "laion", "mmc4"]


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"kind": "video"}, "data.cc.kind: unknown kind 'video'; the kinds: pairs, interleaved"),
        ({}, "data.cc.kind: missing; dataset 'cc' must give its kind (pairs or interleaved)"),
        ({"kind": "pairs", "preprocess": {"max_num_images": 2}}, "unknown key 'data.cc.preprocess.max_num_images'"),
        ({"kind": "pairs", "preprocess": {"max_tokens": 1}}, "data.cc.preprocess.max_tokens: must be >= 2"),
        ({"kind": "pairs", "loss_multiplier": -1}, "data.cc.loss_multiplier: must be >= 0"),
    ],
)
def test_dataset_entry_errors_name_the_key(tmp_path, shards, entry, named):
    data = base_config(shards)
    data["data"]["cc"] = {"shards": shards["laion"], **entry}
    assert named in load_error(tmp_path, data)


def test_dataset_names_and_an_empty_data_section(tmp_path, shards):
    data = base_config(shards)
    data["data"]["total"] = {"kind": "pairs", "shards": shards["laion"]}
    assert "data.total: not a dataset name" in load_error(tmp_path, data)
    data["data"] = {"laion": {"shards": shards["laion"], "enabled": False}}
    assert "data: no dataset is enabled" in load_error(tmp_path, data)


def test_deprecated_loss_multipliers_map_onto_the_datasets(tmp_path, shards):
    data = base_config(shards)
    with pytest.warns(FutureWarning, match=r"loss_multiplier_laion is deprecated: write data.laion.loss_multiplier"):
        cfg = load_config(write_yaml(tmp_path, data), ["loss_multiplier_laion=0.7"])
    assert cfg.data.loss_multipliers() == {"laion": 0.7, "mmc4": 1.0} and cfg.loss_multiplier_laion is None
    data["data"]["laion"]["loss_multiplier"] = 0.5
    message = load_error(tmp_path, data, ["loss_multiplier_laion=0.7"])
    assert "loss_multiplier_laion: set together with data.laion.loss_multiplier" in message
    del data["data"]["mmc4"]
    assert "loss_multiplier_mmc4: data has no dataset named 'mmc4'" in load_error(
        tmp_path, data, ["loss_multiplier_mmc4=1.0"]
    )


def test_held_out_entries_inherit_the_training_preprocessing(tmp_path, shards):
    data = base_config(shards)
    data["data"]["docs"] = {"kind": "interleaved", "shards": shards["mmc4"], "batch_size": 2,
                            "preprocess": {"max_tokens": 64, "min_image_bytes": 500}}  # fmt: skip
    data["eval_loader"] = {
        "docs": {"shards": shards["mmc4"], "preprocess": {"max_tokens": 32}},  # kind and min_image_bytes inherited
        "laion": {"shards": shards["laion"]},
    }
    data["eval_subset_num_batches"] = 1
    cfg = load_config(write_yaml(tmp_path, data))
    held_out = cfg.eval_loader["docs"]
    assert held_out.kind == "interleaved" and (held_out.preprocess.max_tokens, held_out.preprocess.min_image_bytes) == (
        32, 500
    )
    assert cfg.data["docs"].preprocess.max_tokens == 64  # the training entry keeps its own
    data["eval_loader"]["cc"] = {"kind": "pairs", "shards": shards["laion"]}
    assert "eval_loader.cc: no training dataset of that name in data" in load_error(tmp_path, data)
    del data["eval_loader"]["cc"]
    data["eval_loader"]["docs"]["kind"] = "pairs"
    assert "eval_loader.docs.kind: pairs, but data.docs is interleaved" in load_error(tmp_path, data)


def test_model_level_activation_checkpointing(tmp_path, shards):
    from flamingo_composer.training.run import _model_config

    cfg = load_config(write_yaml(tmp_path, base_config(shards)), ["activation_checkpointing=true"])
    assert _model_config(cfg).gradient_checkpointing is True and cfg.model.gradient_checkpointing is False
    data = base_config(shards)
    data["fsdp_config"] = {}
    data["device"] = "gpu"
    message = load_error(tmp_path, data, ["activation_checkpointing=true"])
    assert "set fsdp_config.activation_checkpointing instead" in message


def test_model_sources_checked_at_load(tmp_path, shards):
    message = load_error(tmp_path, base_config(shards), ["model.lm.name=EleutherAI/pythia-70m"])
    assert message == "model.lm: set exactly one of name, config (got name, config)"
    message = load_error(tmp_path, base_config(shards), ["model.tokenizer.builtin=null"])
    assert message == "model.tokenizer: set exactly one of name, builtin (got none)"
    message = load_error(
        tmp_path,
        base_config(shards),
        ["model.vision.custom_config=null", f"model.vision.config_path={tmp_path}/v.json"],
    )
    assert message == f"model.vision.config_path: file not found: {tmp_path}/v.json"


def test_low_precision_frozen_weights_need_an_amp_precision(tmp_path, shards):
    message = load_error(tmp_path, base_config(shards), ["model.frozen_dtype=bfloat16"])
    assert message.startswith("model.frozen_dtype: bfloat16 weights need an amp precision")
