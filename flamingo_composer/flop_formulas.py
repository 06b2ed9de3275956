"""FLOPs that torch's FlopCounterMode counts, plus the CPU attention kernels it has no formula for (a leaf).

torch 2.7's FlopCounterMode counts matmuls, convolutions and the CUDA attention kernels, but not CPU's fused
attention (`_scaled_dot_product_flash_attention_for_cpu` and its backward) nor `nn.MultiheadAttention`'s
inference fast path (`_native_multi_head_attention`, which open_clip's frozen ViTs take): those get the standard
formulas here. `count_flops` runs a function on fake tensors: exact shapes and counts, no compute, no memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ATEN = torch.ops.aten


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)  # model FLOPs: no recompute of the scores


def _native_mha(query, key, value, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, *args,
                out_shape=None, **kwargs) -> int:  # fmt: skip
    """In- and out-projections of every token plus the attention core (batch-first (B, S, E) query)."""
    b, s, _ = query
    return 2 * b * s * (qkv_weight[0] * qkv_weight[1] + proj_weight[0] * proj_weight[1]) + 4 * b * s * s * embed_dim


CPU_ATTENTION_FORMULAS = {
    ATEN._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    ATEN._native_multi_head_attention: _native_mha,
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...], device, dtype):
    """(output shape, forward FLOPs) of `fn` on a zero input of `input_shape`, run on fake tensors without autograd.

    The module's real (or meta) weights are seen as fake tensors too, so nothing is computed or allocated.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        inputs = torch.zeros(input_shape, device=device, dtype=dtype)
        with flop_counter() as counter:
            output = fn(inputs)
    return tuple(output.shape), counter.get_total_flops()
