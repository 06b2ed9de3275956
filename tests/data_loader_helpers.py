"""Shared set-up for the tests/test_data_loader_*.py files: small synthetic data, tokenizer, transform, configs."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torchvision.transforms as T

from flamingo_composer.data.config import DataConfig, DatasetConfig
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig
from flamingo_composer.models.embeddings import add_flamingo_tokens
from flamingo_composer.shards.synthetic import (
    SYNTHETIC_MIN_IMAGE_BYTES,
    SyntheticConfig,
    write_synthetic_dataset,
)
from flamingo_composer.vocab import build_tiny_tokenizer

IMAGE_SIDE = 16
MAX_IMAGES = 3
MMC4_TOKENS = 64

# Every 7th sample is broken (corrupt/missing image, empty caption, bad base64, bad similarity matrix, malformed
# document), so every stream below carries rejections.
SMALL_DATA = SyntheticConfig(
    num_laion=96, num_laion_val=16, num_mmc4=40, num_mmc4_val=8, image_size=32,
    laion_shard_size=16, mmc4_shard_size=8, mds_size_limit=1 << 14, bad_every=7,
)  # fmt: skip


_GENERATED: dict[str, Path] = {}


def synthetic_once(tmp_path_factory, name: str, cfg: SyntheticConfig) -> Path:
    """Synthetic data (wds + mds) for `cfg`, generated once per test session under the name `name`."""
    if name not in _GENERATED:
        root = tmp_path_factory.mktemp(name) / "synthetic"
        write_synthetic_dataset(root, cfg)
        _GENERATED[name] = root
    return _GENERATED[name]


def small_data(tmp_path_factory) -> Path:
    """The loader tests' small synthetic data set."""
    return synthetic_once(tmp_path_factory, "loader-data", SMALL_DATA)


def tokenizer():
    tok = build_tiny_tokenizer()
    add_flamingo_tokens(tok)
    return tok


# A cheap stand-in for the CLIP eval transform: PIL resize to (16, 16), then ToTensor (no Normalize).
image_transform = T.Compose(
    [T.Resize((IMAGE_SIDE, IMAGE_SIDE), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()]
)


def laion_source(root: Path, fmt: str, split: str = "train") -> dict:
    if fmt == "wds":
        count = len(list((root / "wds" / "laion").glob(f"{split}-*.tar")))
        return {"format": "wds", "shards": f"{root}/wds/laion/{split}-{{000000..{count - 1:06d}}}.tar",
                "shuffle_buffer": 8}
    return {"format": "mds", "local": str(root / "mds" / "laion" / split)}


def mmc4_source(root: Path, fmt: str, split: str = "train") -> dict:
    if fmt == "wds":
        count = len(list((root / "wds" / "mmc4").glob(f"{split}-*.tar")))
        return {"format": "wds", "shards": f"{root}/wds/mmc4/{split}-{{000000..{count - 1:06d}}}.tar",
                "shuffle_buffer": 8}
    return {"format": "mds", "local": str(root / "mds" / "mmc4" / split)}


def laion_config(root: Path, fmt: str, **overrides) -> DatasetConfig:
    kwargs = {"kind": "pairs", "batch_size": 4, "seed": 3, **laion_source(root, fmt), **overrides}
    return DatasetConfig(**kwargs)


def mmc4_config(root: Path, fmt: str, **overrides) -> DatasetConfig:
    preprocess = MMC4PreprocessConfig(
        min_image_bytes=SYNTHETIC_MIN_IMAGE_BYTES, max_num_images=MAX_IMAGES, max_tokens=MMC4_TOKENS
    )
    kwargs = {
        "kind": "interleaved",
        "batch_size": 2,
        "seed": 5,
        "preprocess": preprocess,
        **mmc4_source(root, fmt),
    }
    return DatasetConfig(**{**kwargs, **overrides})


def data_config(root: Path, fmt: str, laion: dict | None = None, mmc4: dict | None = None) -> DataConfig:
    """Both datasets enabled unless `laion`/`mmc4` is passed as {'enabled': False}."""
    return DataConfig(
        {"laion": laion_config(root, fmt, **(laion or {})), "mmc4": mmc4_config(root, fmt, **(mmc4 or {}))}
    )


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail (instead of hanging the suite) when the block takes longer than `seconds`."""

    def _raise(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds}s (hang?)")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
