"""The run's text log, kept across restarts: Composer's FileLogger, appending, with one line where each process
starts.

Composer 0.32.1's FileLogger opens its file with mode 'w+' (its `overwrite` is stored as a one-element tuple, so
it is always true): every restart of a run wiped the log of the batches before it. This one appends (unless
`overwrite: true`), and after the checkpoint is loaded writes `[segment][batch=N]: ...`: the batch this process
continues from. `run_logs.read_file_log` lets each segment supersede what earlier ones logged from that batch on
(a killed process logs batches past its last checkpoint, which the next one runs again).
"""

from __future__ import annotations

import os

from composer.core import State
from composer.loggers import FileLogger, Logger

from flamingo_composer.training.run_logs import segment_prefix

__all__ = ["AppendingFileLogger"]


class AppendingFileLogger(FileLogger):
    """FileLogger that appends, and marks where each process of the run starts (see the module docstring)."""

    def init(self, state: State, logger: Logger) -> None:
        self._is_newline = True
        self._run_name = state.run_name
        if self.file is not None:
            raise RuntimeError("The file logger is already initialized")
        folder = os.path.dirname(self.filename)
        if folder:
            os.makedirs(folder, exist_ok=True)
        overwrite = self.overwrite[0] if isinstance(self.overwrite, tuple) else self.overwrite
        cut_line = not overwrite and _ends_inside_a_line(self.filename)  # a killed process's last write
        self.file = open(self.filename, "w+" if overwrite else "a+", buffering=self.buffer_size)  # noqa: SIM115
        if cut_line:
            self.file.write("\n")
        self._flush_queue()

    def after_load(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        self.write(segment_prefix(batch), f"this process runs the batches from {batch} on\n")


def _ends_inside_a_line(path: str) -> bool:
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"
