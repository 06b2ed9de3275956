"""Shared test set-up: never touch the network, keep CPU runs small and deterministic."""

import logging
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


# `make test` runs the suite on 2 pytest-xdist workers, one test module per worker at a time (--dist loadfile), in
# collection order: the longest modules go first so that neither worker is left with one at the end.
LONGEST_MODULES_FIRST = (
    "test_eval_learning.py", "test_fsdp2.py", "test_learning.py", "test_eval_integration.py",
    "test_checkpoint_recovery_dist.py", "test_algorithms.py",
)  # fmt: skip
THREADS_PER_TEST = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2  # the 2 workers share the 2 cores


def pytest_collection_modifyitems(items):
    """The longest modules first, then the other modules with slow (multi-process) tests, then the rest."""
    slow_modules = {item.path.name for item in items if item.get_closest_marker("slow")}

    def module_rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_MODULES_FIRST:
            return (0, LONGEST_MODULES_FIRST.index(name))
        return (1, 0) if name in slow_modules else (2, 0)

    items.sort(key=module_rank)  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _package_logging_restored():
    """An in-process training run configures the package logger (own handler, no propagation); later tests in the
    same worker read its lines with caplog, which needs propagation."""
    package_log = logging.getLogger("flamingo_composer")
    handlers, level, propagate = list(package_log.handlers), package_log.level, package_log.propagate
    yield
    package_log.handlers[:] = handlers
    package_log.setLevel(level)  # (clears the loggers' is-enabled cache, which assigning .level would not)
    package_log.propagate = propagate


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS_PER_TEST)
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
