"""Who is measured: attention implementations ``f(q, k, v, causal) -> o`` on (B, H, N, d) tensors.

``flashcourse`` (the Triton kernels), ``flashcourse-varlen`` (the same kernels through
``flash_attn_varlen_func``, the batch packed as B sequences), ``tiled`` (the FlashAttention-2 loops in
PyTorch), ``naive``
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


def _kernel_dtype(q) -> None:
    """The Triton kernels take float16, bfloat16 and float32: ``Unavailable`` for another dtype."""
    from ..ops import KERNEL_DTYPES

    if q.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(dt).replace("torch.", "") for dt in KERNEL_DTYPES)
        raise Unavailable(f"the Triton kernels take {names}, not {str(q.dtype).replace('torch.', '')}")


def _flashcourse(q, k, v, causal):
    from ..ops import flash_attention

    _kernel_dtype(q)
    return flash_attention(q, k, v, causal=causal)


def _flashcourse_varlen(q, k, v, causal):
    """The B sequences of the batch packed into flash-attn's varlen layout (total, H, d) and attended in
    one launch: the cost of the variable-length path next to the dense kernel's at the same work. The
    time includes packing q, k, v (a copy each) and unpacking the output."""
    from ..flash_attn_interface import flash_attn_varlen_func

    _kernel_dtype(q)
    B, H, N, d = q.shape
    cu_seqlens = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
    packed = [t.transpose(1, 2).reshape(B * N, t.shape[1], d) for t in (q, k, v)]
    out = flash_attn_varlen_func(*packed, cu_seqlens, cu_seqlens, N, N, causal=causal)
    return out.view(B, N, H, d).transpose(1, 2)


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
    "flashcourse-varlen": _flashcourse_varlen,
    "tiled": _tiled,
    "naive": _naive,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
}
