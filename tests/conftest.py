"""Shared test set-up: flashcourse is imported first so that Triton's interpreter is on without a GPU.

Device: tests take the ``device`` fixture ("cuda" when a GPU is there, else "cpu"; the package's
own policy, ``flashcourse._env.resolve_device``), so that the whole suite also runs on a GPU machine.
float32 precision: every test runs at PyTorch's default ``torch.get_float32_matmul_precision()``,
"highest" (IEEE float32 matmuls, no TF32, in PyTorch and in the kernels' ``tl.dot``); a test that
wants TF32 sets it itself, and it is put back after the test.
"""

import flashcourse  # noqa: F401  (must precede any import of triton)
import pytest
import torch

from flashcourse._env import resolve_device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """Where a test runs its tensors: the GPU when there is one, else the CPU (kernels interpreted)."""
    return resolve_device(None).type


@pytest.fixture(autouse=True)
def _autotune(request, monkeypatch):
    """On a GPU the kernels run their first candidate configuration (one compile per key, no timing);
    only the tests marked ``autotune`` time every candidate, as a user's calls do."""
    if request.node.get_closest_marker("autotune") is None:
        monkeypatch.setenv("FLASHCOURSE_AUTOTUNE", "first")
    else:
        monkeypatch.delenv("FLASHCOURSE_AUTOTUNE", raising=False)


@pytest.fixture(autouse=True)
def _float32_matmul_precision():
    """Each test starts at the default "highest" precision, and one that changes it cannot leak."""
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision("highest")
