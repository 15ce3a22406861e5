"""What this machine offers, decided once: the GPU, Triton and its interpreter, and the device policy.

Without a CUDA GPU, Triton kernels run in its interpreter, which must be switched on through the
environment variable ``TRITON_INTERPRET=1`` *before* ``triton`` is imported: the ``@triton.jit``
decorator decides at definition time whether it builds a compiled or an interpreted kernel.

Every ``device`` argument of the package goes through ``resolve_device``, so that a wrong one gets
the same explanation everywhere.
"""

import importlib.util
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
# False for PyTorch's CPU-only builds (version "+cpu"), which cannot use a GPU even when there is one
CUDA_BUILT = torch.backends.cuda.is_built()
# Triton publishes wheels for Linux only: elsewhere the PyTorch chapters run, the kernels do not
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def setup_triton() -> bool:
    """Turn on the Triton interpreter when there is no GPU; return whether it is on.

    Raises ``ImportError`` when ``triton`` was imported before ``flashcourse`` on a machine without a
    GPU and without ``TRITON_INTERPRET=1``: its kernels could then neither compile nor interpret.
    """
    if not HAS_CUDA and not _interpreter_requested():
        if sys.modules.get("triton") is not None:  # None: an import that was blocked
            raise ImportError(
                "flashcourse: `triton` was imported before `flashcourse` on a machine without a CUDA "
                "GPU, so Triton's interpreter is off and no kernel can run.\n"
                "Fix: import flashcourse first (it switches the interpreter on), or set the "
                "environment variable before Python starts:  export TRITON_INTERPRET=1\n"
                "In a notebook: restart the kernel and run `import flashcourse` in the first cell."
            )
        os.environ["TRITON_INTERPRET"] = "1"
    return _interpreter_requested()


INTERPRET = setup_triton()


def resolve_device(device=None) -> torch.device:
    """The package's one device policy: ``None`` -> the GPU when there is one, else the CPU.

    Any other value ("cpu", "cuda", "cuda:1", a ``torch.device``) is checked to exist here, with a
    message that says what to do, instead of PyTorch's "Torch not compiled with CUDA enabled".
    """
    if device is None:
        return torch.device("cuda" if HAS_CUDA else "cpu")
    if not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if device.type == "cuda":
        if not CUDA_BUILT:
            raise ValueError(
                f"device={str(device)!r}, but this PyTorch ({torch.__version__}) is a CPU-only build, which "
                f"cannot use a GPU: install the CUDA build (README.md, 'Which PyTorch?') or use device='cpu'"
            )
        if not HAS_CUDA:
            raise ValueError(
                f"device={str(device)!r}, but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False): "
                f"check the GPU and its driver with `nvidia-smi`, or use device='cpu'"
            )
    return device


def factory_device(device=None):
    """The ``device`` of a function that makes tensors (``causal_mask``, ``empty_state``, ``copy_batch``):
    None stays None, PyTorch's default device, as in ``torch.zeros``; anything else as ``resolve_device``."""
    return None if device is None else resolve_device(device)
