"""FSDP1 settings and the wrap / activation-checkpointing policies for the Flamingo module.

Composer wraps each direct child of the ComposerModel in its own FSDP root and asks that child's
`fsdp_wrap_fn(module)` / `activation_checkpointing_fn(module)` which submodules become units. We give every
perceiver, vision block, LM decoder layer and gated cross-attention block its own unit, and the new-token rows
too, so no FlatParameter mixes frozen and trainable parameters (frozen units then need no gradient memory).
Composer's own `FSDPConfig` accepts any key silently, so `FSDPSettings` lists the keys we accept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

MixedPrecisionName = Literal["DEFAULT", "PURE", "FULL"]


@dataclass
class FSDPSettings:
    """The FSDP1 keys a recipe may set (Composer's `FSDPConfig` names and meanings; other keys are rejected).

    Defaults follow llm-foundry: non-reentrant activation checkpointing, full (monolithic) state dicts.
    """

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"] = (
        "FULL_SHARD"
    )
    # 'DEFAULT' = params in the trainer precision, fp32 gradient reduce; 'PURE' = all low precision; 'FULL' = no
    # FSDP casting; or {param_dtype, reduce_dtype, buffer_dtype}.
    mixed_precision: MixedPrecisionName | dict[str, str] = "DEFAULT"
    activation_checkpointing: bool = False
    activation_checkpointing_reentrant: bool = False
    activation_cpu_offload: bool = False
    use_orig_params: bool = True
    state_dict_type: Literal["full", "sharded"] = "full"
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

    def to_composer(self) -> dict[str, Any]:
        """The `parallelism_config={'fsdp': ...}` dict Composer's Trainer takes."""
        return asdict(self)


def make_fsdp_wrap_fn(flamingo: nn.Module) -> Callable[[nn.Module], bool]:
    """Wrap policy: perceiver, each vision block, each LM decoder layer, each cross-attention block, new-token rows.

    The LM decoder layer is the original `decoder_layer` inside each FlamingoLayer (the FlamingoLayer itself holds
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
        flamingo.decoder_layer_class,
        flamingo.vision_block_class,
    )

    def fsdp_wrap_fn(module: nn.Module) -> bool:
        return isinstance(module, unit_classes)

    return fsdp_wrap_fn


def make_activation_checkpointing_fn(flamingo: nn.Module) -> Callable[[nn.Module], bool]:
    """AC policy: LM decoder layers and gated cross-attention blocks, never the FlamingoLayer around them.

    FlamingoLayer reads the per-call media context; its two children take media as explicit arguments, so their
    recomputation during backward sees the right images.
    """
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    ac_classes = (GatedCrossAttentionBlock, flamingo.decoder_layer_class)

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
