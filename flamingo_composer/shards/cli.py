"""Argument and exit-code plumbing shared by the converter CLIs in tools/ (no heavy imports: --help stays fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--out, --compression, --size-limit, --no-progress: the same for every converter."""
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--compression", default=None, help="MDS shard compression, e.g. zstd (default: none)"
    )
    parser.add_argument("--size-limit", default="64mb", help="MDS shard size limit (default: 64mb)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def output_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `add_output_args`' options, for `run_converter`."""
    return {
        "out": args.out, "compression": args.compression, "size_limit": args.size_limit,
        "progress": not args.no_progress,
    }  # fmt: skip


def add_require_all_arg(parser: argparse.ArgumentParser) -> None:
    """--require-all: fail when any input of a brace range is missing (default: convert what exists, list the rest)."""
    parser.add_argument(
        "--require-all",
        action="store_true",
        help="exit 2 if any local input does not exist (default: convert the inputs that exist and list the missing)",
    )


def run_converter(tool: str, convert: Callable, *args, out: str, **kwargs) -> int:
    """Run `convert(*args, out, ...)`, print its summary; exit 0 if it wrote something, 1 if not, 2 on bad input."""
    try:
        report = convert(*args, out, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"{tool}: {err}", file=sys.stderr)
        return 2
    print(report.summary(out))
    return 0 if report.written else 1
