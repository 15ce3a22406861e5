"""``flash_attention``: the Triton kernels behind one checked, differentiable, compilable function.

The forward and backward kernels are registered as PyTorch custom operators
(``torch.ops.flashcourse.flash_attn_fwd`` and ``flash_attn_bwd``) with a fake (shape-only)
implementation each, so ``torch.compile`` traces through ``flash_attention`` without a graph break,
and with an autograd formula that saves (q, k, v, O, L) and calls the backward kernels.
"""

from typing import Optional

import torch

from ._checks import check_attention_inputs, softmax_scale
from .kernels.common import check_kernel_device
from .kernels.forward import MAX_HEAD_DIM, attention_forward

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("flashcourse::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, H, Nq, d) in q's dtype and L (B, H, Nq) float32, both contiguous."""
    return attention_forward(q, k, v, causal=causal, scale=scale)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    B, H, Nq, d = q.shape
    return q.new_empty((B, H, Nq, d)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("flashcourse::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, H, Nq, d), dk and dv (B, Hkv, Nk, d), contiguous, in the inputs' dtype."""
    try:
        from .kernels.backward import attention_backward
    except ModuleNotFoundError as e:
        if e.name != "flashcourse.kernels.backward":
            raise
        raise NotImplementedError(
            "flash_attention's backward pass needs the Triton backward kernels in "
            "flashcourse/kernels/backward.py (chapter 07), which are not there yet"
        ) from e
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal=causal, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_attn_bwd.register_fake
def _(q, k, v, o, lse, do, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, dlse):
    # L is returned for inspection only: its gradient dlse is not propagated (flash_attention detaches it)
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(q, k, v, o, lse, do, ctx.causal, ctx.scale)  # any dO strides
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False):
    """O = softmax(scale · Q Kᵀ) V by the Triton FlashAttention kernels; differentiable in q, k, v.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with H % Hkv == 0, any strides; float16, bfloat16 or
    float32; any head dim d from 1 to 256. Causal masking is bottom-right aligned (query i sees key
    j <= i + Nk - Nq). Returns O (B, H, Nq, d) in q's dtype and, with ``return_lse``, L (B, H, Nq),
    the natural-log logsumexp of each scaled score row, float32 and detached (no gradient flows
    through it). A row that sees no key gives O = 0 and L = -inf. Runs on CUDA tensors on a GPU
    machine, and on CPU tensors in Triton's interpreter otherwise.

    Numerics: float16 and bfloat16 products are exact, accumulated in float32, and P and dS are
    rounded to nearest (ties to even) before their matmuls, on the GPU and in the interpreter alike.
    float32 inputs are multiplied as PyTorch multiplies float32 matrices: with
    ``torch.get_float32_matmul_precision()`` "highest" (PyTorch's default) in IEEE float32, with
    "high" or "medium" in TF32 on the tensor cores (set it before the call). NaN or +inf reaching a
    score makes its row NaN, as in SDPA; the inputs are not inspected (that would cost a GPU sync).
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"flash_attention runs float16, bfloat16 and float32 tensors, got {q.dtype}; convert the inputs "
            f"(e.g. q.float()) or use flashcourse.naive_attention, which also computes in float64"
        )
    if d > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim d = {d} is too large for the Triton kernels (d <= {MAX_HEAD_DIM}): one block of Q, "
            f"K and V must fit in on-chip memory; split the heads or use flashcourse.tiled_attention"
        )
    check_kernel_device(q=q, k=k, v=v)
    o, lse = flash_attn_fwd(q, k, v, bool(causal), softmax_scale(scale, d))
    return (o, lse.detach()) if return_lse else o
