"""flashcourse: FlashAttention built step by step, and the finished implementations the course grades against.

Importing the package on a machine without a CUDA GPU switches Triton's interpreter on (see ``_env``),
so it must be imported before ``triton``.
"""

from ._env import HAS_CUDA, INTERPRET  # noqa: F401  (must run before anything imports triton)
from .reference import naive_attention, naive_attention_backward

__version__ = "0.1.0"
