"""A TorchDispatchMode that records the ops which make a GPU wait for the host or the host for the GPU: reading a
value back (`item`, `_local_scalar_dense`, `is_nonzero`, `equal`) and ops whose output shape depends on the data
(`nonzero`, `masked_select`, `unique`, boolean-mask indexing, `repeat_interleave` without `output_size`).

On CPU nothing waits, but the same ops run on the GPU, where each is a synchronisation: recording them here proves
a step has none."""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_SHAPED = {
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten._unique.default,
}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostSyncRecorder(TorchDispatchMode):
    """`with HostSyncRecorder() as rec: ...`; `rec.ops` lists (op name, where it was called from)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def _record(self, func) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "torch/utils/_python_dispatch" not in f.filename]
        where = next((f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames)
                      if "flamingo_composer" in f.filename or "transformers" in f.filename), "?")  # fmt: skip
        self.ops.append((str(func.overloadpacket.__name__), where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS or func in DATA_SHAPED:
            self._record(func)
        elif func in INDEXING and _has_bool_index(args):
            self._record(func)
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record(func)
        return func(*args, **kwargs)
