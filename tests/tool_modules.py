"""Import a script of tools/ as a module (tools/ is not a package; its scripts import their siblings)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    """tools/NAME.py as module `NAME` (tools/ goes on sys.path, as when a script there runs)."""
    if str(TOOLS) not in sys.path:
        sys.path.append(str(TOOLS))
    return importlib.import_module(name)
