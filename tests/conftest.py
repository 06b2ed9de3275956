"""Shared test set-up: never touch the network, keep CPU runs small and deterministic."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_FIXTURE = FIXTURES / "openflamingo-tiny-gptneox"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_FIXTURE


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Small synthetic data (wds + MDS, some samples broken on purpose) for the loader tests, one copy per module."""
    from data_loader_helpers import small_data

    return small_data(tmp_path_factory)


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer with the Flamingo tokens added, as the model factory adds them."""
    from data_loader_helpers import tokenizer

    return tokenizer()
