# Your exercises: replace each stub, then run `flashcourse grade ch05`. Generated from solutions/.
"""Chapter 05: the FlashAttention forward kernel in Triton. The launcher is given; you write the kernel.

One program computes the output rows of one query block Q_i (B_r = BLOCK_M rows) of one (batch, head):
it loads Q_i once, streams the key and value blocks K_j, V_j (B_c = BLOCK_N rows) past it with the
online softmax of chapters 02 and 03, and writes O_i and the logsumexp L_i once at the end.
Run `flashcourse grade ch05` to check your work.
"""

import math

import flashcourse  # noqa: F401  (imported before triton: switches the interpreter on without a GPU)
import torch
import triton
import triton.language as tl

from flashcourse.grading import require_implemented, require_kernel_dtype
from flashcourse.kernels.common import load_tile, store_tile  # given: masked 2-d tile load and store

# constants a kernel reads must be tl.constexpr (Triton refuses other globals when it compiles)
LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
LN_2 = tl.constexpr(0.6931471805599453)  # ln(x) = log2(x) · ln 2


@triton.jit
def attention_fwd_kernel(Q, K, V, O, L, Nq, Nk, scale,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O_i (B_r, d) and L_i (B_r,) of the query block i = tl.program_id(0) of the head bh = tl.program_id(1).

    Layout (made contiguous by the launcher): q and O are (B·H, Nq, d), k and v (B·H, Nk, d), L is
    (B·H, Nq); head bh of q starts at Q + bh · Nq · d, and row n of it at + n · d.
    load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols) loads base[rows, cols] with
    zeros outside n_rows × n_cols; store_tile(base, tile, rows, cols, ...) stores inside it only.

    The loop over key blocks j (the online softmax, in base 2: exp(x) = exp2(x · log2 e)):

        S_ij = Q_i K_jᵀ · scale · log2 e          (−inf for keys past Nk, and above the causal diagonal)
        m_new = max(m_i, rowmax(S_ij))
        P̃_ij = exp2(S_ij − m_new),   α = exp2(m_i − m_new)
        l_i = α l_i + rowsum(P̃_ij),   acc_i = α acc_i + P̃_ij V_j,   m_i = m_new

    then O_i = acc_i / l_i and L_i = (m_i + log2 l_i) · ln 2 (natural log). Causal is bottom-right
    aligned: query i sees key j iff j <= i + Nk − Nq; a row that sees no key gets O = 0, L = −inf.

    Hints:
      1. offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M); offs_d = tl.arange(0, HEAD_DIM).
      2. q = load_tile(Q + bh * Nq * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, Nq, HEAD_DIM)
      3. m_i = tl.full([BLOCK_M], float("-inf"), tl.float32); l_i and acc start at zeros (float32).
      4. tl.dot(q, tl.trans(k)) is Q_i K_jᵀ; mask with tl.where(visible, s, float("-inf")).
      5. Where m_new is −inf subtract 0 instead (exp2(−inf − (−inf)) is NaN); divide by l_i only where l_i > 0.
      6. Causal: key blocks starting at or after start_m + BLOCK_M + Nk − Nq are hidden from every row:
         stop the loop there (the FlashAttention speed-up; the mask alone is also correct).
    """
    raise NotImplementedError("ch05.attention_fwd_kernel: not implemented yet")


def flash_attention_forward(q, k, v, causal: bool = False, scale=None, BLOCK_M: int = 16, BLOCK_N: int = 16):
    """Given launcher: q (B, H, Nq, d), k, v (B, H, Nk, d) -> O (B, H, Nq, d) in q's dtype, L (B, H, Nq) float32.

    d must be a power of two from 16 to 128. The grid has one program per (query block, batch·head).
    """
    require_implemented(attention_fwd_kernel)
    require_kernel_dtype(q, k, v)
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"this kernel takes a head dim d of 16, 32, 64 or 128, got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Nq, BLOCK_M), B * H)
    attention_fwd_kernel[grid](q, k, v, o, lse, Nq, Nk, scale,
                               HEAD_DIM=d, CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return o, lse
