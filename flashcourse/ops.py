"""``flash_attention``: the Triton kernels behind one checked, differentiable, compilable function.

The forward and backward kernels are registered as PyTorch custom operators
(``torch.ops.flashcourse.flash_attn_fwd`` and ``flash_attn_bwd``) with a fake (shape-only)
implementation each, so ``torch.compile`` traces through ``flash_attention`` without a graph break,
and with an autograd formula that saves (q, k, v, O, L) and calls the backward kernels. The dropout's
(seed, offset) is drawn outside the operators and handed to both, so that each stays a pure function
of its inputs and the backward regenerates the forward's mask.
"""

import numbers
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
from .kernels.sequences import DENSE, Sequences, sequence_shape

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
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    block_table: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O (B, H, Nq, d) in q's dtype, L (B, H, Nq) float32, and P̃ (B, H, Nq', Nk') or an empty tensor.

    O is contiguous, or a (B, H, Nq, d) view of contiguous (B, Nq, H, d) memory with ``out_bnhd``
    (flash-attn's layout, written in place by the kernel). ``cu_seqlens_q`` .. ``block_table``: a
    packed batch (``kernels.sequences``): q (1, H, total_q, d), k and v (1, Hkv, total_k, d) or pages.
    """
    B, H, Nq, d = q.shape
    seqs = _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    out = None
    if out_bnhd:  # packed rows of no sequence stay 0
        out = (torch.zeros if cu_seqlens_q is not None else torch.empty)((B, Nq, H, d), dtype=q.dtype, device=q.device)
        out = out.transpose(1, 2)
    o, lse, *probs = attention_forward(
        q, k, v, causal=causal, scale=scale, out=out,
        window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        rng_state=rng_state, return_probs=return_probs, sequences=seqs,
    )
    return o, lse, probs[0] if return_probs else q.new_empty(0)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
      rng_state=None, return_probs=False, out_bnhd=False, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
      max_seqlen_k=0, block_table=None):
    B, H, Nq, d = q.shape
    o = q.new_empty((B, Nq, H, d)).transpose(1, 2) if out_bnhd else q.new_empty((B, H, Nq, d))
    if return_probs:
        seqs = _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
        B_seq, Nq_max, Nk_max = sequence_shape(q, k, seqs)
        padded = [-(-n // PROBS_PADDING) * PROBS_PADDING for n in (Nq_max, Nk_max)]
        probs = q.new_empty((B_seq, H, *padded))
    else:
        probs = q.new_empty(0)
    return o, q.new_empty((B, H, Nq), dtype=torch.float32), probs


def _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table) -> Sequences:
    """The packed layout of the operators' arguments (``kernels.sequences``); None fields: dense."""
    return Sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q if cu_seqlens_q is not None else None,
                     max_seqlen_k if cu_seqlens_k is not None else None, block_table=block_table)


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
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    block_table: Optional[torch.Tensor] = None,
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
        sequences=_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table),
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_attn_bwd.register_fake
def _(q, k, v, o, lse, do, causal, scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
      dropout_p=0.0, rng_state=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
      block_table=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, _, _,
     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table) = inputs
    o, lse, _ = output
    ctx.save_for_backward(q, k, v, o, lse, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, block_table)
    ctx.options = (causal, scale, window_left, window_right, softcap)
    ctx.dropout_p = dropout_p
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)


def _backward(ctx, do, dlse, dprobs):
    # L and P̃ are returned for inspection only: their gradients are not propagated (they are detached)
    q, k, v, o, lse, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, block_table = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(q, k, v, o, lse, do, *ctx.options, alibi_slopes, ctx.dropout_p, rng_state,
                                cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, block_table)
    return dq, dk, dv, *[None] * 15


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_outputs(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0,
                            alibi_slopes=None, dropout_p=0.0, return_probs=False, out_bnhd=False,
                            sequences: Sequences = DENSE):
    """The checked call behind ``flash_attention`` and the flash-attn compatible functions: (O, L, P̃).

    Every argument is validated here, once; ``out_bnhd`` makes O a (B, H, Nq, d) view of contiguous
    (B, Nq, H, d) memory. P̃ is an empty tensor unless ``return_probs``. ``sequences``: a packed batch
    (``kernels.sequences``; q (1, H, total_q, d), k and v (1, Hkv, total_k, d), or pages), whose
    ``cu_seqlens_*`` and ``block_table`` are checked here too.
    """
    # a paged k, v: (pages, Hkv, page_size, d), checked page by page like one batch element
    _, H, Hkv, Nq, Nk, d = check_attention_inputs(q, *((k[:1], v[:1]) if sequences.paged else (k, v)))
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
    sequences = check_sequences(q, k, sequences)
    B = sequence_shape(q, k, sequences)[0]
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
                                   return_probs, out_bnhd, sequences.cu_seqlens_q, sequences.cu_seqlens_k,
                                   sequences.max_seqlen_q or 0, sequences.max_seqlen_k or 0, sequences.block_table)
    return o, lse.detach(), probs.detach()


# ------------------------------------------------------------------------------------------------
# Packed batches (flash-attn's varlen layout) and caches: their index tensors are int32, as flash-attn's


def check_index(name: str, t, shape: tuple, device, what: str) -> None:
    """``t``: an int32 tensor of ``shape`` on ``device``; ``what`` says what it holds."""
    want = f"an int32 tensor of shape {shape} on {device} ({what})"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {want}, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be {want}, got {t.dtype}; convert it with {name}.int()")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it with {name}.to(q.device)")


def check_max_seqlen(name: str, value) -> int:
    """A maximum sequence length: an int >= 0 (a one-element integer tensor is taken too)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise TypeError(f"{name} must be an int >= 0, the length of the longest sequence, got {value!r}")
    return int(value)


def _check_cu_seqlens(name: str, cu: torch.Tensor, rows: int, max_name: str, max_seqlen: int) -> None:
    """cu_seqlens' values: 0, never decreasing, at most ``rows``; no sequence longer than ``max_seqlen``.

    Reading the values waits for the GPU, so it is done eagerly only (torch.compile skips it)."""
    if torch.compiler.is_compiling():
        return
    cu = cu.tolist()
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0 or min(lengths) < 0 or cu[-1] > rows:
        raise ValueError(
            f"{name} must be the cumulative sequence lengths [0, n_0, n_0 + n_1, ...]: starting at 0, never "
            f"decreasing, ending at most at the {rows} packed rows; got {cu}. Build it with "
            f"torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen}, but {name} has a sequence of {max(lengths)}: pass the "
                         f"longest length (e.g. int(lengths.max()))")


def check_sequences(q, k, seqs: Sequences) -> Sequences:
    """The packed layout of a flash-attn varlen call, checked: ``seqs`` with max_seqlen_q/k as ints.

    q (1, H, total_q, d); k (1, Hkv, total_k, d), or (pages, Hkv, page_size, d) with a block_table.
    """
    if seqs.cu_seqlens_q is None:
        return seqs
    cu_q = seqs.cu_seqlens_q
    # (B + 1,) with B >= 1 sequences: the shape cu_seqlens_q suggests, which cu_seqlens_k must share
    shape = (max(cu_q.numel() if isinstance(cu_q, torch.Tensor) and cu_q.dim() == 1 else 0, 2),)
    B = shape[0] - 1
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", seqs.cu_seqlens_k)):
        check_index(name, cu, shape, q.device, "the cumulative sequence lengths of the B >= 1 sequences, B + 1 "
                                               "of them, the same number for q and k")
    max_q = check_max_seqlen("max_seqlen_q", seqs.max_seqlen_q)
    max_k = check_max_seqlen("max_seqlen_k", seqs.max_seqlen_k)
    _check_cu_seqlens("cu_seqlens_q", seqs.cu_seqlens_q, q.shape[2], "max_seqlen_q", max_q)
    if seqs.paged:
        pages = seqs.block_table.shape[-1] if isinstance(seqs.block_table, torch.Tensor) else 0
        check_index("block_table", seqs.block_table, (B, pages), q.device,
                    "the pages of each sequence, one row per sequence")
        if max_k > pages * k.shape[2]:
            raise ValueError(f"max_seqlen_k = {max_k} keys do not fit in the {pages} pages of {k.shape[2]} rows "
                             f"that block_table gives each sequence")
        _check_cu_seqlens("cu_seqlens_k", seqs.cu_seqlens_k, 2**62, "max_seqlen_k", max_k)
    else:
        _check_cu_seqlens("cu_seqlens_k", seqs.cu_seqlens_k, k.shape[2], "max_seqlen_k", max_k)
    return seqs._replace(max_seqlen_q=max_q, max_seqlen_k=max_k)


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
