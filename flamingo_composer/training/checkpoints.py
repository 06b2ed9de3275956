"""Checkpoints that survive a kill at any moment, around Composer 0.32.1's CheckpointSaver and autoresume.

What Composer 0.32.1 does, and what this module changes:
- A monolithic checkpoint (`ep{E}-ba{B}-rank0.pt`: DDP, FSDP `state_dict_type: full`) is written in place, so a
  kill during the save leaves a partial file under the final name, and Composer's folder check then refuses every
  restart (FileExistsError). Here it is written under `ep{E}-ba{B}-rank0.partial.pt` and renamed when complete.
  A sharded checkpoint (`ep{E}-ba{B}/`) is complete when its `.metadata` exists: torch writes that file last, by
  rename, after every rank's `.distcp`; so a folder without it is an unfinished save.
- Autoresume follows the `latest` link blindly: a damaged target fails with a bare unpickling or zip error, a
  missing target restarts from batch 0. Here, before the model is built, rank 0 scans `save_folder`: unfinished
  saves are removed, checkpoints are checked newest first (a `.pt` opens as a torch archive; a sharded folder's
  `.metadata` reads and every `.distcp` it names is long enough), a damaged one is renamed to `<name>.damaged`,
  and the link is pointed at the newest complete checkpoint. Each removal or skip is one warning line. When
  checkpoints exist but none is complete, the run stops with a config error listing them.
- Rotation (`save_num_checkpoints_to_keep`) counted only this process's saves, so checkpoints from before a
  restart stayed forever. Here it counts every checkpoint of the folder up to the one just saved.
- `load_path` is checked the same way before the model is built (missing, unreadable, not this trainer's).

Local save folders only: a remote `save_folder` (s3://...) is left to Composer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.callbacks import CheckpointSaver
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist, format_name_with_dist, parse_uri

from flamingo_composer.config_schema import ConfigError

__all__ = [
    "LATEST_MONOLITHIC",
    "LATEST_SHARDED",
    "AtomicCheckpointSaver",
    "build_checkpoint_saver",
    "checkpoint_problem",
    "prepare_checkpoints",
    "rotation_victims",
]

log = logging.getLogger(__name__)

# The names the trainer saves under: Composer's default `save_filename` (rank 0's file) and FSDP's default
# `sharded_ckpt_prefix_dir`, and the `latest` links run.py asks for.
MONOLITHIC_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank0\.pt$")
SHARDED_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)$")
PARTIAL_NAME = re.compile(r"^ep\d+-ba\d+-rank\d+\.partial\..+$")
LATEST_MONOLITHIC = "latest-rank{rank}.pt"
LATEST_SHARDED = "latest-sharded-rank{rank}"
DAMAGED_SUFFIX = ".damaged"
SHARDED_METADATA = ".metadata"


# ---------------------------------------------------------------------------------------------------------------
# Is this a complete checkpoint of this trainer?


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be loaded as a checkpoint of this trainer, or None when it can.

    Reads the `.pt` archive's pickle (tensors memory-mapped, not read) or the sharded folder's `.metadata` and file
    sizes: cheap beside the load itself, and it catches what a cut write or copy leaves.
    """
    path = Path(path)
    if not path.exists():
        return "missing" + (" (the link points at nothing)" if path.is_symlink() else "")
    return _sharded_problem(path) if path.is_dir() else _monolithic_problem(path)


def _error_text(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _monolithic_problem(path: Path) -> str | None:
    import torch

    try:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip, whose directory is its last part
            return (
                f"truncated or not a torch checkpoint (no zip directory at the end of its {path.stat().st_size} bytes)"
            )
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # damaged inside, unreadable: all the same to the caller
        return f"unreadable ({_error_text(exc)})"
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "timestamp" not in state:
        if isinstance(saved, dict) and "perceiver.latents" in saved:
            return "a released OpenFlamingo checkpoint, not a Composer one: give it as load_reference_checkpoint"
        return "not a Composer checkpoint (no state.model and state.timestamp)"
    if not any(key.startswith("model.perceiver.") for key in state["model"]):
        return "not a checkpoint of this trainer (no Flamingo perceiver under state.model)"
    return None


def _sharded_problem(folder: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / SHARDED_METADATA).is_file():
        return f"unfinished save (no {SHARDED_METADATA})"
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:
        return f"{SHARDED_METADATA} unreadable or truncated ({_error_text(exc)})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if (actual := file.stat().st_size) < size:
            return f"{name} is truncated ({actual} of {size} bytes)"
    if not any(key.startswith("state.model.model.perceiver.") for key in metadata.state_dict_metadata):
        return "not a checkpoint of this trainer (no Flamingo perceiver under state.model)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# What a save folder holds.


@dataclass(frozen=True)
class Found:
    """One checkpoint of the folder, by its name (the batch orders them)."""

    path: Path
    batch: int


def list_checkpoints(folder: Path, *, sharded: bool) -> list[Found]:
    """The checkpoints of one kind in `folder` by name (complete or not), oldest first."""
    pattern = SHARDED_NAME if sharded else MONOLITHIC_NAME
    found = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = pattern.match(entry.name)
        if match and entry.is_dir() == sharded and not entry.is_symlink():
            found.append(Found(entry, int(match.group("batch"))))
    return sorted(found, key=lambda f: f.batch)


def _remove_unfinished_saves(folder: Path, *, sharded: bool) -> None:
    """Delete what a kill during a save leaves (never a complete checkpoint), one warning line each."""
    unfinished = [p for p in folder.iterdir() if PARTIAL_NAME.match(p.name) and p.is_file()]
    if sharded:
        unfinished += [f.path for f in list_checkpoints(folder, sharded=True)
                       if not (f.path / SHARDED_METADATA).is_file()]  # fmt: skip
    for path in unfinished:
        log.warning("%s: removed, an unfinished checkpoint save (the run was stopped while writing it)", path)
        _delete(path)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # `.metadata` first: a kill in the middle leaves an unfinished folder, which the next start removes.
        (path / SHARDED_METADATA).unlink(missing_ok=True)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _set_aside(path: Path, problem: str) -> None:
    """Rename a damaged checkpoint out of the checkpoint names (kept for inspection; a later one replaces it)."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    if target.exists() or target.is_symlink():
        _delete(target)
    path.rename(target)
    log.warning("checkpoint %s skipped: %s; renamed to %s", path, problem, target.name)


def _point_latest_at(link: Path, checkpoint: Path) -> None:
    """Make `link` (Composer's `latest` symlink, relative as Composer writes it) name `checkpoint`."""
    target = os.path.relpath(checkpoint, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.exists() and not link.is_symlink():  # a copy that followed the link (cp -L): keep it, out of the way
        aside = link.with_name(link.name + ".not-a-link")
        if aside.exists():
            _delete(aside)
        link.rename(aside)
        log.warning("%s is a copy, not a link; renamed to %s", link, aside.name)
    before = f"{os.readlink(link)}{'' if link.exists() else ', missing'}" if link.is_symlink() else "no link"
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    log.warning("%s now points at %s (was: %s)", link, target, before)


def newest_complete_checkpoint(folder: Path, *, sharded: bool, latest_link: str) -> Path | None:
    """Rank 0's work before an autoresumed run: clean `folder`, choose and link its newest complete checkpoint.

    Unfinished saves are removed; checkpoints are checked newest first, and the damaged ones newer than the chosen
    one are renamed to `<name>.damaged`. Raises ConfigError, leaving the checkpoints as they are, when checkpoints
    exist and none is complete. None when the folder holds no checkpoint (a fresh run).
    """
    if not folder.is_dir():
        return None
    _remove_unfinished_saves(folder, sharded=sharded)
    skipped: list[tuple[Path, str]] = []
    chosen = None
    for found in reversed(list_checkpoints(folder, sharded=sharded)):
        problem = checkpoint_problem(found.path)
        if problem is None:
            chosen = found.path
            break
        skipped.append((found.path, problem))
    if chosen is None:
        if skipped:
            listing = "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
            raise ConfigError(
                f"autoresume: no complete checkpoint in {folder} to resume from ({listing}). To start the run "
                "over, move these away (or set save_folder to a new folder)"
            )
        return None
    for path, problem in skipped:
        _set_aside(path, problem)
    _point_latest_at(folder / latest_link, chosen)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Before the model is built: every rank gets rank 0's verdict.


def _is_remote(path: str) -> bool:
    return parse_uri(path)[0] != ""


def _local_save_folder(save_folder: str | None, run_name: str | None) -> Path | None:
    if not save_folder or _is_remote(save_folder):
        return None
    if "{run_name}" in save_folder and not run_name:
        return None  # Composer names the run later; a new run has nothing to resume
    return Path(format_name_with_dist(save_folder, run_name or ""))


def _rank_zero_plan(
    save_folder: str | None, *, run_name: str | None, autoresume: bool, load_path: str | None, sharded: bool
) -> str:
    folder = _local_save_folder(save_folder, run_name)
    if folder is not None and folder.is_dir():
        try:
            if autoresume:
                latest = (LATEST_SHARDED if sharded else LATEST_MONOLITHIC).format(rank=0)
                chosen = newest_complete_checkpoint(folder, sharded=sharded, latest_link=latest)
                if chosen is not None:
                    ignored = f" (load_path {load_path} is used only when save_folder has none)" if load_path else ""
                    return f"autoresume: continuing from {chosen}{ignored}"
            else:
                _remove_unfinished_saves(folder, sharded=sharded)
        except OSError as exc:  # e.g. a folder this user may read but not change
            raise ConfigError(f"save_folder: {folder}: {_error_text(exc)}") from exc
    if load_path and not _is_remote(load_path):
        if not Path(load_path).exists():
            raise ConfigError(f"load_path: file not found: {load_path}")
        if (problem := checkpoint_problem(load_path)) is not None:
            raise ConfigError(f"load_path: {load_path} cannot be loaded: {problem}")
        return f"loading {load_path}"
    return "starting from batch 0" if autoresume and folder is not None else ""


def prepare_checkpoints(
    save_folder: str | None, *, run_name: str | None, autoresume: bool, load_path: str | None, sharded: bool
) -> str:
    """Call on every rank before the model is built (distributed already initialised).

    Rank 0 cleans the save folder and points `latest` at the newest complete checkpoint (autoresume), or checks
    `load_path`; every rank then raises the same ConfigError, or gets the same description of where the run
    starts.
    """
    verdict: list[Any] = [None]
    failure = None
    if dist.get_global_rank() == 0:
        try:
            verdict = [("ok", _rank_zero_plan(save_folder, run_name=run_name, autoresume=autoresume,
                                              load_path=load_path, sharded=sharded))]  # fmt: skip
        except ConfigError as exc:
            verdict = [("error", str(exc))]
        except Exception as exc:  # the other ranks must not wait on the broadcast for ever
            verdict, failure = [("failed", _error_text(exc))], exc
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    outcome, text = verdict[0]
    if outcome == "error":
        raise ConfigError(text)
    if outcome == "failed":
        raise failure or RuntimeError(f"rank 0 failed while checking the checkpoints: {text}")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Saving.


def partial_name(filename: str) -> str:
    """`ep0-ba6-rank0.pt` -> `ep0-ba6-rank0.partial.pt`: the extension, which picks Composer's writer, stays."""
    folder, name = os.path.split(filename)
    stem, dot, extensions = name.partition(".")
    return os.path.join(folder, f"{stem}.partial{dot}{extensions}")


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _monolithic_writes_by_rename() -> Iterator[None]:
    """Composer 0.32.1 writes a monolithic checkpoint with `checkpoint._write_checkpoint_file(state_dict, name)`:
    while this is active, that writes `partial_name(name)`, syncs it to disk (as torch's sharded writer syncs its
    files) and renames it to `name`."""
    write = composer_checkpoint._write_checkpoint_file

    def write_then_rename(state_dict: dict[str, Any], filename: str) -> None:
        partial = partial_name(filename)
        try:
            write(state_dict, partial)
            _fsync(partial)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        os.replace(partial, filename)
        with contextlib.suppress(OSError):  # the rename itself, on file systems that sync folders
            _fsync(os.path.dirname(filename) or ".")

    composer_checkpoint._write_checkpoint_file = write_then_rename
    try:
        yield
    finally:
        composer_checkpoint._write_checkpoint_file = write


def rotation_victims(checkpoint: Path, *, sharded: bool, keep: int) -> list[Path]:
    """The checkpoints to delete after saving `checkpoint` so that `keep` remain: the oldest of the folder's
    checkpoints up to this one (also those of earlier processes of the run). Later ones (another run's, only with
    `save_overwrite`) are left alone."""
    match = (SHARDED_NAME if sharded else MONOLITHIC_NAME).match(checkpoint.name)
    if match is None or keep < 0:
        return []
    batch = int(match.group("batch"))
    older = [f.path for f in list_checkpoints(checkpoint.parent, sharded=sharded) if f.batch <= batch]
    return older[: max(len(older) - keep, 0)]


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer 0.32.1's CheckpointSaver with monolithic saves written by rename, rotation over the whole folder,
    and the folder-conflict error naming this trainer's keys."""

    def _save_checkpoint(self, state, logger) -> None:
        with _monolithic_writes_by_rename():
            super()._save_checkpoint(state, logger)

    def _rotate_checkpoints(self, sharding_enabled: bool = False) -> None:
        saved = Path(self.saved_checkpoints[-1])
        checkpoint = saved.parent if sharding_enabled else saved  # a sharded save names this rank's .distcp
        if dist.get_global_rank() == 0:
            for victim in rotation_victims(checkpoint, sharded=sharding_enabled, keep=self.num_checkpoints_to_keep):
                _delete(victim)
        del self.saved_checkpoints[: max(len(self.saved_checkpoints) - self.num_checkpoints_to_keep, 0)]

    def fit_start(self, state, logger) -> None:
        try:
            super().fit_start(state, logger)
        except FileExistsError as exc:
            message = str(exc).replace(
                "set overwrite=True", "set save_overwrite: true (or autoresume: true to continue that run)"
            )
            raise FileExistsError(message) from None


def build_checkpoint_saver(
    *, save_folder: str | None, sharded: bool, save_interval: str, keep: int, overwrite: bool, ignore_keys: Any
) -> AtomicCheckpointSaver | None:
    """The saver the Trainer would make from its `save_*` arguments (Composer 0.32.1's `Trainer.__init__`), as
    an AtomicCheckpointSaver; pass it in `callbacks` and the Trainer uses it."""
    if save_folder is None:
        return None
    filename = "ep{epoch}-ba{batch}-rank{rank}.pt"
    latest = LATEST_SHARDED if sharded else LATEST_MONOLITHIC
    remote_folder = parse_uri(save_folder)[2]
    return AtomicCheckpointSaver(
        folder=save_folder,
        filename=filename,
        remote_file_name=str(Path(remote_folder) / filename) if remote_folder else filename,
        latest_filename=latest,
        latest_remote_file_name=str(Path(remote_folder) / latest) if remote_folder else latest,
        save_interval=save_interval,
        overwrite=overwrite,
        num_checkpoints_to_keep=keep,
        ignore_keys=ignore_keys,
    )


# ---------------------------------------------------------------------------------------------------------------
# For messages: the newest checkpoint a run has written.


def last_checkpoint_of_run(state) -> Path | None:
    """The newest checkpoint in the save folder of the run's CheckpointSaver (a local folder), or None."""
    for saver in (cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)):
        folder = _local_save_folder(saver.folder, state.run_name)
        if folder is None:
            continue
        found = list_checkpoints(folder, sharded=True) + list_checkpoints(folder, sharded=False)
        if found:
            return max(found, key=lambda f: f.batch).path
    return None
