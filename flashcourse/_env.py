"""Choose how Triton runs before anything imports it.

Without a CUDA GPU, Triton kernels run in its interpreter, which must be switched on through the
environment variable ``TRITON_INTERPRET=1`` *before* ``triton`` is imported: the ``@triton.jit``
decorator decides at definition time whether it builds a compiled or an interpreted kernel.
"""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def setup_triton() -> bool:
    """Turn on the Triton interpreter when there is no GPU; return whether it is on.

    Raises ``ImportError`` when ``triton`` was imported before ``flashcourse`` on a machine without a
    GPU and without ``TRITON_INTERPRET=1``: its kernels could then neither compile nor interpret.
    """
    if not HAS_CUDA and not _interpreter_requested():
        if "triton" in sys.modules:
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
