"""Loader configuration: one `DatasetConfig` per dataset (LAION, MMC4) and the `DataConfig` that holds both.

Plain dataclasses with YAML-friendly field types (the training config embeds them). Constructing an enabled
dataset's config already checks what can be checked without reading data: the format, the batch size, and that
every local shard path (after brace expansion) or local MDS directory exists, so a typo stops the run before
anything heavy starts, with the path named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from webdataset.shardlists import expand_urls

from flamingo_composer.data.laion import LaionPreprocessConfig
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig

# The dataset names, in forward order (LAION, then MMC4, as the reference does): the keys of a batch, of the loss
# and of the metrics; `DataConfig` has one field per name.
DATASETS = ("laion", "mmc4")


def is_remote_url(url: str) -> bool:
    """True for `pipe:` commands and scheme URLs (s3://, gs://, http(s)://...); False for local paths / file:."""
    if url.startswith("pipe:"):
        return True
    scheme, sep, _ = url.partition("://")
    return (
        bool(sep) and scheme != "file" and len(scheme) > 1
    )  # len > 1: a Windows drive letter is not a scheme


def local_path(url: str) -> str:
    """The filesystem path of a local shard URL (`file://` stripped)."""
    return url[len("file://") :] if url.startswith("file://") else url


def expand_shards(shards: str | list[str] | None, where: str = "shards") -> list[str]:
    """Brace-expand a shard spec (a string, `::`-separated strings, or a list of them) into URLs.

    A local directory stands for its `*.tar` files in sorted order (as the converters accept directories).
    Raises ValueError when the result is empty or a local path does not exist, naming `where` and the path.
    """
    if shards is None:
        raise ValueError(f"{where}: no shards given (set a path, brace pattern, directory, URL or pipe: command)")
    specs = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"{where}: every entry must be a string, got {type(spec).__name__} {spec!r}")
        for url in expand_urls(spec):
            if url.strip() and not is_remote_url(url) and os.path.isdir(local_path(url)):
                urls.extend(_tar_files_in(local_path(url), where))
            else:
                urls.append(url)
    urls = [url for url in urls if url.strip()]
    if not urls:
        raise ValueError(f"{where}: the shard list {shards!r} is empty")
    missing = [
        local_path(url) for url in urls if not is_remote_url(url) and not os.path.isfile(local_path(url))
    ]
    if missing:
        more = (
            f" (and {len(missing) - 3} more; {len(missing)} of {len(urls)} missing)"
            if len(missing) > 3
            else ""
        )
        raise ValueError(f"{where}: local shard path does not exist: {', '.join(missing[:3])}{more}")
    return urls


def _tar_files_in(directory: str, where: str) -> list[str]:
    """The `*.tar` files directly inside `directory`, sorted; ValueError naming it when there are none."""
    tars = sorted(str(path) for path in Path(directory).glob("*.tar") if path.is_file())
    if not tars:
        raise ValueError(
            f"{where}: directory {directory!r} holds no *.tar file (a directory stands for its webdataset "
            "tar shards; give a brace pattern such as 'dir/{000000..000099}.tar' for other names)"
        )
    return tars


# Keys that only one reader uses; setting one for the other format is a config error, never silently ignored.
FORMAT_ONLY_KEYS = {
    "wds": ("shards", "shuffle_buffer", "resample"),
    "mds": ("local", "remote", "split", "shuffle_block_size"),
}


@dataclass
class DatasetConfig:
    """One dataset's reader and per-rank batching (fields shared by LAION and MMC4).

    format 'wds': `shards` = brace pattern(s), local paths, remote URLs or `pipe:` commands.
    format 'mds': `local` (a directory holding index.json, or the cache dir when `remote` is set), `remote`,
    `split` (sub-directory of both, optional).
    `epoch_size`: samples per loader epoch over all ranks (optional for MDS and local webdataset shards, where
    it defaults to the number of samples in the data; required for remote webdataset shards).
    """

    enabled: bool = True
    format: Literal["wds", "mds"] = "wds"
    shards: str | list[str] | None = None
    local: str | None = None
    remote: str | None = None
    split: str | None = None
    batch_size: int = 8  # per rank, valid samples per batch
    num_workers: int = 0
    prefetch_factor: int = 2
    shuffle: bool = True
    shuffle_buffer: int = 1000  # wds sample shuffle buffer (samples per worker); <= 1 disables it
    resample: bool = False  # wds: draw shards with replacement (an endless stream without epochs of shards)
    seed: int = 0
    epoch_size: int | None = None
    shuffle_block_size: int = 1 << 18  # mds: unit of streaming's 'py1e' shuffle (samples)
    max_consecutive_skips: int = 10_000  # stop (instead of spinning) when the data yields nothing usable

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor: must be >= 1, got {self.prefetch_factor}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ValueError(f"epoch_size: must be >= 1 samples, got {self.epoch_size}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips: must be >= 1, got {self.max_consecutive_skips}")
        if self.format not in FORMAT_ONLY_KEYS:
            raise ValueError(f"format: must be 'wds' or 'mds', got {self.format!r}")
        self._check_keys_fit_format()
        if self.format == "wds":
            self.shard_urls()  # raises naming the missing path / empty list
        else:
            self.check_mds_location()

    def _check_keys_fit_format(self) -> None:
        """A key of the other format (e.g. `shards` on an MDS dataset) would be silently ignored: reject it."""
        defaults = {f.name: f.default for f in fields(DatasetConfig)}
        for other, keys in FORMAT_ONLY_KEYS.items():
            if other == self.format:
                continue
            for key in keys:
                if getattr(self, key) != defaults[key]:
                    raise ValueError(
                        f"{key}: applies to format '{other}' only, but this dataset reads format "
                        f"'{self.format}' (its keys: {', '.join(FORMAT_ONLY_KEYS[self.format])}); "
                        f"set format: {other} to use it, or remove it"
                    )

    def shard_urls(self) -> list[str]:
        """The expanded webdataset shard URLs (checked: non-empty, local paths exist)."""
        return expand_shards(self.shards, "shards")

    def mds_local_dir(self) -> str:
        """The directory streaming reads index.json from (local, plus split)."""
        if not self.local:
            raise ValueError(
                "local: an MDS dataset needs a local directory (the data itself, or the cache for remote)"
            )
        return os.path.join(self.local, self.split) if self.split else self.local

    def check_mds_location(self) -> None:
        """Without a remote, the local MDS directory must hold an index.json (named in the error)."""
        directory = self.mds_local_dir()
        if self.remote is None:
            index = os.path.join(directory, "index.json")
            if not os.path.isfile(index):
                raise ValueError(f"local: MDS index not found: {index} (no remote set to download it from)")


@dataclass
class LaionDatasetConfig(DatasetConfig):
    """LAION-style image-text pairs."""

    batch_size: int = 16
    preprocess: LaionPreprocessConfig = field(default_factory=LaionPreprocessConfig)


@dataclass
class MMC4DatasetConfig(DatasetConfig):
    """MMC4-style interleaved documents."""

    batch_size: int = 8
    preprocess: MMC4PreprocessConfig = field(default_factory=MMC4PreprocessConfig)


def _disabled_laion() -> LaionDatasetConfig:
    return LaionDatasetConfig(enabled=False)


def _disabled_mmc4() -> MMC4DatasetConfig:
    return MMC4DatasetConfig(enabled=False)


@dataclass
class DataConfig:
    """Both datasets of the dual-batch loader; a disabled (or absent) dataset is left out of every batch."""

    laion: LaionDatasetConfig = field(default_factory=_disabled_laion)
    mmc4: MMC4DatasetConfig = field(default_factory=_disabled_mmc4)

    def __post_init__(self) -> None:
        if not (self.laion.enabled or self.mmc4.enabled):
            raise ValueError("laion: both datasets are disabled; enable laion and/or mmc4")

    def enabled(self) -> dict[str, DatasetConfig]:
        """{'laion': cfg, 'mmc4': cfg} for the enabled datasets, LAION first."""
        return {name: getattr(self, name) for name in DATASETS if getattr(self, name).enabled}

    def batch_sizes(self) -> tuple[int | None, int | None]:
        """(LAION batch size, MMC4 batch size) per rank; None for a disabled dataset."""
        return (
            self.laion.batch_size if self.laion.enabled else None,
            self.mmc4.batch_size if self.mmc4.enabled else None,
        )
