"""``flash_attention``: the Triton kernels behind one checked, differentiable, compilable function.

The forward and backward kernels are registered as PyTorch custom operators
(``torch.ops.flashcourse.flash_attn_fwd`` and ``flash_attn_bwd``) with a fake (shape-only)
implementation each, so ``torch.compile`` traces through ``flash_attention`` without a graph break,
and with an autograd formula that saves (q, k, v, O, L) and calls the backward kernels. The dropout's
(seed, offset) is drawn outside the operators and handed to both, so that each stays a pure function
of its inputs and the backward regenerates the forward's mask.
"""

from typing import Optional

import torch

from ._checks import (
    check_alibi_slopes,
    check_attention_inputs,
    check_dropout_p,
    check_flag,
    check_softcap,
    check_window_size,
    softmax_scale,
)
from .kernels.common import check_kernel_device
from .kernels.forward import MAX_HEAD_DIM, PROBS_PADDING, attention_forward
from .kernels.scores import new_rng_state

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("flashcourse::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    return_probs: bool = False,
    out_bnhd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O (B, H, Nq, d) in q's dtype, L (B, H, Nq) float32, and P̃ (B, H, Nq', Nk') or an empty tensor.

    O is contiguous, or a (B, H, Nq, d) view of contiguous (B, Nq, H, d) memory with ``out_bnhd``
    (flash-attn's layout, written in place by the kernel).
    """
    B, H, Nq, d = q.shape
    out = torch.empty((B, Nq, H, d), dtype=q.dtype, device=q.device).transpose(1, 2) if out_bnhd else None
    o, lse, *probs = attention_forward(
        q, k, v, causal=causal, scale=scale, out=out, window_size=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state, return_probs=return_probs,
    )
    return o, lse, probs[0] if return_probs else q.new_empty(0)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
      rng_state=None, return_probs=False, out_bnhd=False):
    B, H, Nq, d = q.shape
    o = q.new_empty((B, Nq, H, d)).transpose(1, 2) if out_bnhd else q.new_empty((B, H, Nq, d))
    if return_probs:
        padded = [-(-n // PROBS_PADDING) * PROBS_PADDING for n in (Nq, k.shape[2])]
        probs = q.new_empty((B, H, *padded))
    else:
        probs = q.new_empty(0)
    return o, q.new_empty((B, H, Nq), dtype=torch.float32), probs


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
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
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
    dq, dk, dv = attention_backward(
        q, k, v, o, lse, do, causal=causal, scale=scale, window_size=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_attn_bwd.register_fake
def _(q, k, v, o, lse, do, causal, scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
      dropout_p=0.0, rng_state=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, _, _ = inputs
    o, lse, _ = output
    ctx.save_for_backward(q, k, v, o, lse, alibi_slopes, rng_state)
    ctx.options = (causal, scale, window_left, window_right, softcap)
    ctx.dropout_p = dropout_p


def _backward(ctx, do, dlse, dprobs):
    # L and P̃ are returned for inspection only: their gradients are not propagated (they are detached)
    q, k, v, o, lse, alibi_slopes, rng_state = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(q, k, v, o, lse, do, *ctx.options, alibi_slopes, ctx.dropout_p, rng_state)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_outputs(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0,
                            alibi_slopes=None, dropout_p=0.0, return_probs=False, out_bnhd=False):
    """The checked call behind ``flash_attention`` and the flash-attn compatible functions: (O, L, P̃).

    Every argument is validated here, once; ``out_bnhd`` makes O a (B, H, Nq, d) view of contiguous
    (B, Nq, H, d) memory. P̃ is an empty tensor unless ``return_probs``.
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
    causal = check_flag("causal", causal)
    scale = softmax_scale(scale, d)
    left, right = check_window_size(window_size)
    softcap = check_softcap(softcap)
    alibi_slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)
    dropout_p = check_dropout_p(dropout_p)
    check_flag("return_attn_probs", return_probs)
    # dropout's (seed, offset), from torch's default generator of q's device (torch.manual_seed repeats it)
    rng_state = new_rng_state(q.device) if dropout_p > 0 else None
    o, lse, probs = flash_attn_fwd(q, k, v, causal, scale, left, right, softcap, alibi_slopes, dropout_p, rng_state,
                                   return_probs, out_bnhd)
    return o, lse.detach(), probs.detach()


def flash_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0, return_attn_probs: bool = False):
    """O = softmax(scale · Q Kᵀ) V by the Triton FlashAttention kernels; differentiable in q, k, v.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with H % Hkv == 0, any strides; float16, bfloat16 or
    float32; any head dim d from 1 to 256. Causal masking is bottom-right aligned (query i sees key
    j <= i + Nk - Nq). Returns O (B, H, Nq, d) in q's dtype and, with ``return_lse``, L (B, H, Nq),
    the natural-log logsumexp of each score row, float32 and detached (no gradient flows through
    it). A row that sees no key gives O = 0 and L = -inf. Runs on CUDA tensors on a GPU machine,
    and on CPU tensors in Triton's interpreter otherwise.

    flash-attn's options, in flash-attn's order on each score s_ij = scale · q_i · k_j:
    - ``softcap`` > 0: s = softcap · tanh(s / softcap);
    - ``alibi_slopes``, float32 (H,) or (B, H): s = s - slope · |i + Nk - Nq - j|;
    - ``window_size`` = (left, right): query i sees keys i + Nk - Nq - left <= j <= i + Nk - Nq + right
      (-1: no limit on that side; ``causal`` is right = 0). Key blocks wholly outside are skipped;
    - softmax, then ``dropout_p``: each weight is dropped with probability p and the others scaled by
      1 / (1 - p), from a Philox stream seeded by torch's default generator of q's device
      (``torch.manual_seed`` repeats it); the backward regenerates the same mask.
    ``return_attn_probs`` returns (O, L, P̃) with P̃ (B, H, Nq, Nk) in q's dtype: exp(s_ij - m_i),
    m_i the row maximum (P = P̃ / rowsum P̃), negated where the dropout dropped the weight.

    Numerics: float16 and bfloat16 products are exact, accumulated in float32, and P and dS are
    rounded to nearest (ties to even) before their matmuls, on the GPU and in the interpreter alike.
    float32 inputs are multiplied as PyTorch multiplies float32 matrices: with
    ``torch.get_float32_matmul_precision()`` "highest" (PyTorch's default) in IEEE float32, with
    "high" or "medium" in TF32 on the tensor cores (set it before the call). NaN or +inf reaching a
    score makes its row NaN, as in SDPA; the inputs are not inspected (that would cost a GPU sync).
    The backward is deterministic: a second run gives bitwise the same gradients.
    """
    check_flag("return_lse", return_lse)
    o, lse, probs = flash_attention_outputs(
        q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, return_probs=return_attn_probs,
    )
    if return_attn_probs:
        return o, lse, probs[:, :, : q.shape[2], : k.shape[2]]
    return (o, lse) if return_lse else o
