"""Per-sample random generators, so a resumed run repeats every random choice.

A generator seeded by (seed, epoch, sample key) gives the same flip and the same single-image drop for a sample
whatever worker, rank or resume point reads it.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _key_words(key: str | bytes | int) -> list[int]:
    """A stable 128-bit digest of the sample key (Python's hash() is salted per process)."""
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def sample_rng(seed: int, epoch: int, key: str | bytes | int) -> np.random.Generator:
    """The generator for one sample's random choices: same (seed, epoch, key) -> same draws."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"sample_rng: seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), *_key_words(key)]))
