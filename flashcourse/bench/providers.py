"""Who is measured: attention implementations ``f(q, k, v, causal) -> o`` on (B, H, N, d) tensors.

``flashcourse`` (the Triton kernels), ``tiled`` (the FlashAttention-2 loops in PyTorch), ``naive``
(S and P materialised), and PyTorch's ``scaled_dot_product_attention`` pinned to one backend each:
``sdpa-flash`` (FlashAttention-2), ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``. A provider that
cannot run on this device or dtype raises ``Unavailable`` (or PyTorch's "No available kernel"), and
its measurement is marked skipped with the reason.
"""

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ..reference import naive_attention
from ..tiled import tiled_attention

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
SLOW = ("tiled",)  # a Python loop over tiles: skipped above ``Plan.slow_max_n``


class Unavailable(Exception):
    """A provider that cannot run here (no such backend on this device or dtype, not built yet)."""


def _flashcourse(q, k, v, causal):
    from ..ops import KERNEL_DTYPES, flash_attention

    if q.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(dt).replace("torch.", "") for dt in KERNEL_DTYPES)
        raise Unavailable(f"the Triton kernels take {names}, not {str(q.dtype).replace('torch.', '')}")
    return flash_attention(q, k, v, causal=causal)


def _tiled(q, k, v, causal):
    return tiled_attention(q, k, v, causal=causal)


def _naive(q, k, v, causal):
    return naive_attention(q, k, v, causal=causal)


def _sdpa(backend_name: str) -> Provider:
    def run(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # is_causal is top-left aligned; the benchmark has Nq == Nk, where that is bottom-right too
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    run.__name__ = f"sdpa_{backend_name.lower()}"
    return run


PROVIDERS: Dict[str, Provider] = {
    "flashcourse": _flashcourse,
    "tiled": _tiled,
    "naive": _naive,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
}
