"""flashcourse: FlashAttention built step by step, and the finished implementations the course grades against.

Importing the package on a machine without a CUDA GPU switches Triton's interpreter on (see ``_env``),
so it must be imported before ``triton``.
"""

from ._env import HAS_CUDA, HAS_TRITON, INTERPRET  # noqa: F401  (must run before anything imports triton)
from ._checks import causal_mask
from .reference import naive_attention, naive_attention_backward
from .softmax import SoftmaxState, merge_states, online_softmax, safe_softmax
from .tiled import tiled_attention, tiled_attention_backward, tiled_attention_forward
from . import bench  # noqa: F401  (notebooks time with fc.bench.time_ms)
from .grading import check

if HAS_TRITON:  # Triton publishes wheels for Linux only: elsewhere the PyTorch chapters still run
    from .ops import flash_attention
    from .flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                       flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                       flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
    from .nn import FlashAttention, FlashCrossAttention, FlashSelfAttention, MultiHeadAttention
else:
    def __getattr__(name):
        raise ImportError(
            f"flashcourse.{name} needs Triton, which is not installed: Triton runs on Linux only (on macOS or "
            f"Windows use WSL2, a container or a hosted notebook: README.md, 'Which machines')"
        )

__version__ = "0.1.0"
