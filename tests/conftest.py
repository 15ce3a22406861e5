"""Shared test set-up: flashcourse is imported first so that Triton's interpreter is on without a GPU."""

import flashcourse  # noqa: F401  (must precede any import of triton)
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where a test runs its tensors: the GPU when there is one, else the CPU (kernels interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
