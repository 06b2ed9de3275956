"""Loader configuration: `data:` maps names to datasets, each a `DatasetConfig` of a kind (data/kinds.py), held in
config order by a `DataConfig`.

Plain dataclasses with YAML-friendly field types (the training config embeds them). Constructing an enabled
dataset's config already checks what can be checked without reading data: the kind, the format, the batch size,
and that every local shard path (after brace expansion) or local MDS directory exists, so a typo stops the run
before anything heavy starts, with the path named.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from webdataset.shardlists import expand_urls

from flamingo_composer.config_schema import ConfigError, from_dict
from flamingo_composer.data.kinds import DEFAULT_KINDS, DatasetKind, forward_order, kind_named, kind_of


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
    """One dataset: its kind, reader, per-rank batching, preprocessing and weight in the loss.

    `kind`: a name of data/kinds.KINDS (`pairs`, `interleaved`); `preprocess`: the kind's preprocessing settings
    (a mapping is validated into them). `batch_size` and `loss_multiplier` left out (null) take the kind's
    defaults (`effective_loss_multiplier`).
    format 'wds': `shards` = brace pattern(s), local paths, remote URLs or `pipe:` commands.
    format 'mds': `local` (a directory holding index.json, or the cache dir when `remote` is set), `remote`,
    `split` (sub-directory of both, optional).
    `epoch_size`: samples per loader epoch over all ranks (optional for MDS and local webdataset shards, where
    it defaults to the number of samples in the data; required for remote webdataset shards).
    """

    kind: str | None = None
    enabled: bool = True
    format: Literal["wds", "mds"] = "wds"
    shards: str | list[str] | None = None
    local: str | None = None
    remote: str | None = None
    split: str | None = None
    batch_size: int | None = None  # per rank, valid samples per batch; null: the kind's default
    loss_multiplier: float | None = None  # this dataset's weight in the loss; null: the kind's default
    num_workers: int = 0
    prefetch_factor: int = 2
    shuffle: bool = True
    shuffle_buffer: int = 1000  # wds sample shuffle buffer (samples per worker); <= 1 disables it
    resample: bool = False  # wds: draw shards with replacement (an endless stream without epochs of shards)
    seed: int = 0
    epoch_size: int | None = None
    shuffle_block_size: int = 1 << 18  # mds: unit of streaming's 'py1e' shuffle (samples)
    max_consecutive_skips: int = 10_000  # stop (instead of spinning) when the data yields nothing usable
    preprocess: Any = None  # the kind's preprocess dataclass; null: its defaults

    def __post_init__(self) -> None:
        if self.kind is None:
            raise ValueError("kind: missing (one of the names of data/kinds.KINDS)")
        kind = self.kind_spec  # raises naming an unknown kind
        if self.preprocess is None or isinstance(self.preprocess, Mapping):
            self.preprocess = from_dict(kind.preprocess_config, dict(self.preprocess or {}), "preprocess")
        elif not isinstance(self.preprocess, kind.preprocess_config):
            raise ValueError(
                f"preprocess: a {kind.name} dataset takes {kind.preprocess_config.__name__}, got "
                f"{type(self.preprocess).__name__}"
            )
        if self.batch_size is None:
            self.batch_size = kind.batch_size
        if not self.enabled:
            return
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.loss_multiplier is not None and self.loss_multiplier < 0:
            raise ValueError(f"loss_multiplier: must be >= 0, got {self.loss_multiplier}")
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

    @property
    def kind_spec(self) -> DatasetKind:
        """The kind's registry entry (data/kinds.py)."""
        return kind_named(self.kind)

    @property
    def effective_loss_multiplier(self) -> float:
        """The configured loss multiplier, or the kind's default."""
        return self.kind_spec.loss_multiplier if self.loss_multiplier is None else float(self.loss_multiplier)

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


# A dataset's name is a key of batches, losses (`loss/train/<name>`), metrics and dotted overrides
# (`data.<name>.batch_size=4`); `total` is the loss dict's own key.
DATASET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED_NAMES = ("total",)


@dataclass
class DataConfig(Mapping[str, DatasetConfig]):
    """The datasets by name, in config order (the order of `data:`); a disabled dataset is left out of every
    batch but keeps its name (its metrics, its held-out entry).

    Orders: batches hold the enabled datasets in config order, and microbatch sizes count the samples of the
    first (`lead`); microbatches run in `forward_order` (by kind, data/kinds.py).
    """

    datasets: dict[str, DatasetConfig]

    def __post_init__(self) -> None:
        for name, dataset in self.datasets.items():
            if not isinstance(name, str) or not DATASET_NAME.match(name) or name in RESERVED_NAMES:
                raise ValueError(
                    f"{name}: not a dataset name (letters, digits, '_' and '-', starting with a letter; not "
                    f"{', '.join(RESERVED_NAMES)})"
                )
            if not isinstance(dataset, DatasetConfig):
                raise ValueError(f"{name}: expected a DatasetConfig, got {type(dataset).__name__}")
        if not self.enabled():
            raise ValueError("no dataset is enabled: give at least one (a name with format, data and kind)")

    @classmethod
    def from_plain(cls, data: Any, path: str = "data") -> DataConfig:
        """`{name: {kind, format, ..., preprocess: {...}}}` (YAML) -> DataConfig, every error naming its dotted key.

        `kind` may be left out for the names of data/kinds.DEFAULT_KINDS; `NAME: null` removes an entry (one a
        base recipe set).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of dataset names to datasets, got {type(data).__name__}")
        datasets = {}
        for name, entry in data.items():
            where = f"{path}.{name}"
            if entry is None:
                continue
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: expected a mapping (a dataset), got {type(entry).__name__} {entry!r}")
            try:
                kind = kind_of(str(name), entry.get("kind"))
            except ValueError as exc:
                raise ConfigError(f"{where}.{exc}") from exc
            preprocess = from_dict(kind.preprocess_config, entry.get("preprocess") or {}, f"{where}.preprocess")
            datasets[name] = from_dict(DatasetConfig, {**entry, "kind": kind.name, "preprocess": preprocess}, where)
        try:
            return cls(datasets)
        except ValueError as exc:
            named = str(exc).split(":")[0] in datasets  # the message starts with the dataset's name
            raise ConfigError(f"{path}.{exc}" if named else f"{path}: {exc}") from exc

    def __getitem__(self, name: str) -> DatasetConfig:
        return self.datasets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.datasets)

    def __len__(self) -> int:
        return len(self.datasets)

    def enabled(self) -> dict[str, DatasetConfig]:
        """{name: dataset} of the enabled datasets, in config order."""
        return {name: dataset for name, dataset in self.datasets.items() if dataset.enabled}

    @property
    def lead(self) -> str:
        """The first enabled dataset: microbatch sizes count its samples."""
        return next(iter(self.enabled()))

    def batch_sizes(self) -> dict[str, int]:
        """{name: per-rank batch size} of the enabled datasets, in config order."""
        return {name: dataset.batch_size for name, dataset in self.enabled().items()}

    def loss_multipliers(self) -> dict[str, float]:
        """{name: loss multiplier} of every dataset (configured, or its kind's default)."""
        return {name: dataset.effective_loss_multiplier for name, dataset in self.datasets.items()}

    def forward_order(self) -> list[str]:
        """The enabled datasets in the order their microbatches run (data/kinds.forward_order)."""
        return forward_order({name: dataset.kind_spec for name, dataset in self.enabled().items()})


def inherit_preprocessing(held_out: Any, training: Any) -> Any:
    """Plain (YAML) held-out entries with their training entry's `kind` and `preprocess` underneath: a held-out
    dataset preprocesses as its training dataset does, unless it sets a key itself. Entries without a training
    entry of their name, and anything that is not a mapping, are returned as they are (validation names them)."""
    if not isinstance(held_out, Mapping) or not isinstance(training, Mapping):
        return held_out
    out = dict(held_out)
    for name, entry in held_out.items():
        source = training.get(name)
        if not isinstance(entry, Mapping) or not isinstance(source, Mapping):
            continue
        merged = dict(entry)
        kind = source.get("kind", DEFAULT_KINDS.get(name))
        if entry.get("kind", kind) != kind:
            continue  # another kind's preprocessing does not apply: validation names the differing kind
        if "kind" in source:
            merged["kind"] = source["kind"]
        own, inherited = entry.get("preprocess"), source.get("preprocess")
        if isinstance(inherited, Mapping) and (own is None or isinstance(own, Mapping)):
            merged["preprocess"] = {**inherited, **(own or {})}
        out[name] = merged
    return out
