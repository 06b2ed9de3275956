"""FSDP settings (torch FSDP2 `fully_shard`, or FSDP1) and the wrap / activation-checkpointing policies.

Composer wraps each direct child of the ComposerModel (here the one Flamingo module) and asks that child's
`fsdp_wrap_fn(module)` / `activation_checkpointing_fn(module)` which submodules become units, under FSDP1 and
FSDP2 alike. We give every perceiver, vision block, LM decoder layer and gated cross-attention block its own
unit, and the new-token rows too, so no unit mixes frozen and trainable parameters (FSDP1 flat parameters need
that to skip gradient memory of frozen weights; FSDP2 shards per parameter, and a unit of one dtype can keep
frozen weights in a lower precision).

Why FSDP2 is the recipes' default (`version: 2`): it is the path that is tested end to end here (it runs on CPU
over gloo: losses, gradients and resumed runs equal DDP's, see tests/test_fsdp2.py); it shards per parameter
(DTensor), so frozen and trainable tensors need no separate flat parameters; its full-state checkpoints can leave
frozen weights out before anything is gathered (`torch.distributed.checkpoint`'s `ignore_frozen_params`), which
FSDP1's full state dict cannot; it is what torchtitan and torchtune train with. What it lacks in Composer 0.32.1:
`device_train_microbatch_size: auto` (FSDP1 only). FSDP1 stays available for GPUs (`version: 1`); Composer
cannot run it on CPU (it passes a CUDA device id).

Composer's own `FSDPConfig` accepts any key silently, so `FSDPSettings` lists the keys we accept, per version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from torch import nn

MixedPrecisionName = Literal["DEFAULT", "PURE", "FULL"]
ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"]

# Keys only one FSDP version understands (set to a non-default value under the other version: a config error).
FSDP1_ONLY_KEYS = (
    "activation_checkpointing_reentrant", "use_orig_params", "limit_all_gathers", "sync_module_states",
    "forward_prefetch", "forward_prefetch_limit", "backward_prefetch", "backward_prefetch_limit",
    "keep_low_precision_grads",
)  # fmt: skip
FSDP2_ONLY_KEYS = ("reshard_after_forward",)


@dataclass
class FSDPSettings:
    """The FSDP keys a recipe may set (Composer's names and meanings; other keys are rejected).

    version 2 maps `sharding_strategy` onto `fully_shard`: FULL_SHARD reshards parameters after forward,
    SHARD_GRAD_OP keeps them gathered until backward (`reshard_after_forward` overrides either), HYBRID_SHARD /
    _HYBRID_SHARD_ZERO2 shard within groups of `data_parallel_shard_degree` ranks and replicate across
    `data_parallel_replicate_degree` groups (a 2-D device mesh). Defaults follow llm-foundry: non-reentrant
    activation checkpointing (FSDP2 has no other), sharded state dicts (trainable tensors only, see run.py).
    """

    version: Literal[1, 2] = 2
    sharding_strategy: ShardingStrategy = "FULL_SHARD"
    # 'DEFAULT' = params in the trainer precision, fp32 gradient reduce; 'PURE' = all low precision; 'FULL' = no
    # FSDP casting; (FSDP1 only) or {param_dtype, reduce_dtype, buffer_dtype}.
    mixed_precision: MixedPrecisionName | dict[str, str] = "DEFAULT"
    activation_checkpointing: bool = False
    activation_checkpointing_reentrant: bool = False
    activation_cpu_offload: bool = False
    reshard_after_forward: bool | None = None  # FSDP2; None: from sharding_strategy
    use_orig_params: bool = True
    state_dict_type: Literal["full", "sharded"] = "sharded"
    limit_all_gathers: bool = True
    sync_module_states: bool = False
    forward_prefetch: bool = False
    forward_prefetch_limit: int = 1
    backward_prefetch: Literal["NONE", "BACKWARD_PRE", "BACKWARD_POST"] = "BACKWARD_POST"
    backward_prefetch_limit: int = 1
    data_parallel_shard_degree: int = -1
    data_parallel_replicate_degree: int | None = None
    keep_low_precision_grads: bool = False
    load_monolith_rank0_only: bool = False
    verbose: bool = False
    # Ranks other than 0 build the model on the meta device (no weights read, no host copy) and receive rank 0's
    # weights when Composer shards it (FSDP1: sync_module_states; FSDP2: a broadcast of rank 0's state).
    mixed_init: bool = True

    def __post_init__(self):
        if not self.use_orig_params:
            raise ValueError(
                "use_orig_params: false is not supported: FSDP's flat parameters then need one uniform "
                "requires_grad and one optimizer param group, so they cannot hold a partly frozen model or the "
                "separate weight-decay groups (cross-attention vs. perceiver/new-token rows)"
            )
        if isinstance(self.mixed_precision, dict):
            allowed = {"param_dtype", "reduce_dtype", "buffer_dtype"}
            unknown = sorted(set(self.mixed_precision) - allowed)
            if unknown:
                raise ValueError(f"mixed_precision: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if self.activation_cpu_offload and not self.activation_checkpointing:
            raise ValueError("activation_cpu_offload: needs activation_checkpointing: true")
        defaults = {f.name: f.default for f in fields(FSDPSettings)}
        other_only = FSDP1_ONLY_KEYS if self.version == 2 else FSDP2_ONLY_KEYS
        for key in other_only:
            if getattr(self, key) != defaults[key]:
                raise ValueError(f"{key}: applies to FSDP version {3 - self.version} only (this config has version: "
                                 f"{self.version})")
        if self.version == 2:
            if self.sharding_strategy == "NO_SHARD":
                raise ValueError("sharding_strategy: NO_SHARD has no FSDP2 form; remove fsdp_config to train with DDP")
            if isinstance(self.mixed_precision, dict):
                raise ValueError("mixed_precision: FSDP2 takes DEFAULT, PURE or FULL (a dtype mapping is FSDP1 only)")
            if self.hybrid and self.data_parallel_replicate_degree is None and self.data_parallel_shard_degree < 1:
                raise ValueError(
                    "data_parallel_shard_degree: HYBRID_SHARD under FSDP2 needs the group size (ranks that shard "
                    "one replica, e.g. the GPUs of a node), or data_parallel_replicate_degree"
                )

    @property
    def hybrid(self) -> bool:
        return self.sharding_strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")

    def to_composer(self) -> dict[str, Any]:
        """The `parallelism_config` Composer's Trainer takes: {'fsdp': FSDPConfig kwargs} or {'fsdp': FSDP2Config}.

        FSDP2's 2-D mesh for HYBRID sharding needs the process group: call after `dist.initialize_dist`.
        """
        if self.version == 1:
            kwargs = asdict(self)
            for key in ("version", "mixed_init", *FSDP2_ONLY_KEYS):
                kwargs.pop(key)
            kwargs["sync_module_states"] = self.sync_module_states or self.mixed_init
            return {"fsdp": kwargs}
        from composer.utils import FSDP2Config

        reshard = self.reshard_after_forward
        if reshard is None:
            reshard = self.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
        return {
            "fsdp": FSDP2Config(
                device_mesh=self._hybrid_mesh() if self.hybrid else None,
                reshard_after_forward=reshard,
                activation_checkpointing=self.activation_checkpointing,
                activation_cpu_offload=self.activation_cpu_offload,
                state_dict_type=self.state_dict_type,
                load_monolith_rank0_only=self.load_monolith_rank0_only,
                mixed_precision=self.mixed_precision,
                verbose=self.verbose,
            )
        }

    def _hybrid_mesh(self):
        """(replicate, shard) device mesh over all ranks: FSDP2 shards along dim 1, replicates along dim 0."""
        import torch
        from composer.utils import dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        shard = self.data_parallel_shard_degree
        replicate = self.data_parallel_replicate_degree
        if shard < 1:
            shard = world // replicate
        replicate = replicate or world // shard
        if replicate * shard != world:
            raise ValueError(
                f"fsdp_config: data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree ({shard}) "
                f"must equal the world size ({world})"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return init_device_mesh(device, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def average_fsdp2_gradients_on_gloo(model: nn.Module) -> int:
    """Make FSDP2's gradient reduction a mean over ranks on the gloo backend (CPU); returns the units fixed.

    FSDP2 reduces fp32 gradients with `ReduceOp.AVG`, which gloo silently computes as a SUM: on CPU every gradient
    came out `world_size` times too large (NCCL averages). Each unit's all-reduce hook, which runs on the
    reduced (reduce-scattered, and for HSDP all-reduced) gradient shard, divides it by the world size.
    """
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import FSDPModule

    if not torch_dist.is_initialized() or torch_dist.get_backend() != "gloo":
        return 0
    world_size = torch_dist.get_world_size()
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_all_reduce_hook(lambda reduced: reduced.div_(world_size))
    return len(units)


def keep_root_gathered_after_forward(model: nn.Module) -> bool:
    """Keep the FSDP2 root unit's parameters gathered after forward; returns whether a setting changed.

    The loss projects the final hidden states with the LM head (or the tied embedding), which lives in the root
    unit, after the model's forward (composer_model.FlamingoComposerModel.loss). torch 2.7 never reshards the root
    after forward; later releases do when `reshard_after_forward` is passed explicitly, as Composer passes it,
    and the head's weight is then a DTensor shard when the loss reads it."""
    from torch.distributed.fsdp import FSDPModule

    # The outermost unit, first in module order: Composer shards the Flamingo inside the ComposerModel.
    root = next((module for module in model.modules() if isinstance(module, FSDPModule)), None)
    if root is None or not hasattr(root, "set_reshard_after_forward"):
        return False
    root.set_reshard_after_forward(False, recurse=False)
    return True


def make_fsdp_wrap_fn(flamingo: nn.Module) -> Callable[[nn.Module], bool]:
    """Wrap policy: perceiver, each vision block, each LM decoder layer, each cross-attention block, new-token rows.

    Every class of a hybrid stack is a unit (e.g. attention and Mamba layers). The LM decoder layer is the original
    `decoder_layer` inside each FlamingoLayer (the FlamingoLayer itself holds
    no parameter of its own, so it needs no unit). The new-token rows live in their own `NewTokenRows` module; the
    frozen embedding matrix and the other leftovers (patch embedding, final norms, LM head) stay in the root unit.
    """
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock
    from flamingo_composer.models.embeddings import NewTokenRows
    from flamingo_composer.models.perceiver import PerceiverResampler

    unit_classes = (
        PerceiverResampler,
        GatedCrossAttentionBlock,
        NewTokenRows,
        *flamingo.decoder_layer_classes,
        *flamingo.vision_block_classes,
    )

    def fsdp_wrap_fn(module: nn.Module) -> bool:
        return isinstance(module, unit_classes)

    return fsdp_wrap_fn


def make_activation_checkpointing_fn(flamingo: nn.Module) -> Callable[[nn.Module], bool]:
    """AC policy: LM decoder layers (every class) and gated cross-attention blocks, never the FlamingoLayer around
    them.

    FlamingoLayer reads the per-call media context; its two children take media as explicit arguments, so their
    recomputation during backward sees the right images.
    """
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    ac_classes = (GatedCrossAttentionBlock, *flamingo.decoder_layer_classes)

    def activation_checkpointing_fn(module: nn.Module) -> bool:
        return isinstance(module, ac_classes)

    return activation_checkpointing_fn


def install_fsdp_policies(composer_model: nn.Module) -> nn.Module:
    """Set `fsdp_wrap_fn` / `activation_checkpointing_fn` on the ComposerModel's single child (the Flamingo module).

    Composer clips gradients per FSDP root, and every direct child is a root: one child keeps the clip global.
    """
    children = [name for name, child in composer_model.named_children() if _becomes_fsdp_root(child)]
    if children != ["model"]:
        raise ValueError(
            f"FSDP needs the Flamingo module as the ComposerModel's single child 'model'; found children {children} "
            "(each direct child becomes its own FSDP root, which would make gradient clipping per-root, not global)"
        )
    flamingo = composer_model.model
    flamingo.fsdp_wrap_fn = make_fsdp_wrap_fn(flamingo)
    flamingo.activation_checkpointing_fn = make_activation_checkpointing_fn(flamingo)
    return flamingo


def _becomes_fsdp_root(child: nn.Module) -> bool:
    """Composer's rule: every direct child except torchmetrics objects and children marked `_fsdp_wrap = False`."""
    from torchmetrics import Metric, MetricCollection

    if isinstance(child, Metric | MetricCollection):
        return False
    return not (hasattr(child, "_fsdp_wrap") and not child._fsdp_wrap)


def composer_wrap_decision(flamingo: nn.Module) -> Callable[[nn.Module], bool]:
    """Composer's FSDP1 decision for a module inside the child: `_fsdp_wrap` wins, else `fsdp_wrap_fn`."""

    def decide(module: nn.Module) -> bool:
        if hasattr(module, "_fsdp_wrap"):
            return bool(module._fsdp_wrap)
        wrap_fn = getattr(flamingo, "fsdp_wrap_fn", None)
        return bool(wrap_fn(module)) if callable(wrap_fn) else False

    return decide


def simulate_fsdp_units(flamingo: nn.Module) -> dict[str, list[str]]:
    """Which parameters land in which FSDP unit, as FSDP1 would build them (for tests and debugging).

    The wrapped modules are those torch's own `CustomPolicy` selects with Composer's decision function; each
    parameter belongs to the innermost wrapped module around it. Returns {unit module name ('' = the root):
    [parameter names]}.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    targets = CustomPolicy(composer_wrap_decision(flamingo))._run_policy(flamingo, set(), {})
    unit_names = {module: name for name, module in flamingo.named_modules() if module in targets}
    units: dict[str, list[str]] = {"": [], **{name: [] for name in unit_names.values() if name}}

    def visit(module: nn.Module, prefix: str, owner: str) -> None:
        for pname, _ in module.named_parameters(recurse=False):
            units[owner].append(f"{prefix}{pname}")
        for cname, child in module.named_children():
            child_name = f"{prefix}{cname}"
            visit(child, f"{child_name}.", child_name if child in unit_names else owner)

    visit(flamingo, "", "")
    return units
