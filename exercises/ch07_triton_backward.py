# Your exercises: replace each stub, then run `flashcourse grade ch07`. Generated from solutions/.
"""Chapter 07: the FlashAttention backward kernels in Triton. The preprocess kernel and the launchers
are given; you write the dK/dV kernel and the dQ kernel.

The formulas of chapter 06, one tile at a time, with P_ij = exp(S_ij − L_i) recomputed from the
forward's logsumexp L:

    dV_j = Σ_i P_ijᵀ dO_i        dS_ij = P_ij ∘ (dO_i V_jᵀ − D_i)        D_i = rowsum(dO_i ∘ O_i)
    dK_j = scale · Σ_i dS_ijᵀ Q_i        dQ_i = scale · Σ_j dS_ij K_j

Two kernels so that each output is written by one program without atomics: a program per key block
accumulates dK_j, dV_j over the query blocks; a program per query block accumulates dQ_i over the
key blocks. Layout (made contiguous by the launchers): q, o, do, dq are (B·H, Nq, d); k, v, dk, dv
(B·H, Nk, d); L and D (B·H, Nq). Row n of head bh of q starts at Q + (bh · Nq + n) · d.
Run `flashcourse grade ch07` to check your work.
"""

import math

import flashcourse  # noqa: F401  (imported before triton: switches the interpreter on without a GPU)
import torch
import triton
import triton.language as tl

from flashcourse.grading import require_implemented, require_kernel_dtype
from flashcourse.kernels.common import load_tile, store_tile  # given: masked 2-d tile load and store


@triton.jit
def preprocess_kernel(O, dO, Delta, Nq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Given: D_i = rowsum(dO_i ∘ O_i) for the query block tl.program_id(0) of head tl.program_id(1)."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = load_tile(O + bh * Nq * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, Nq, HEAD_DIM)
    do = load_tile(dO + bh * Nq * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, Nq, HEAD_DIM)
    # D_i = rowsum(dO_i ∘ O_i)
    tl.store(Delta + bh * Nq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=offs_m < Nq)


@triton.jit
def dkdv_kernel(Q, K, V, dO, dK, dV, L, Delta, Nq, Nk, scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK_j, dV_j (B_c, d) of the key block j = tl.program_id(0) of head bh = tl.program_id(1).

    Load K_j, V_j once; loop over the query blocks i (BLOCK_M rows each), loading Q_i, dO_i, L_i, D_i:

        S_ijᵀ = scale · K_j Q_iᵀ            P_ijᵀ = exp(S_ijᵀ − L_i)   (0 where hidden)
        dV_j += P_ijᵀ dO_i       dP_ijᵀ = V_j dO_iᵀ       dS_ijᵀ = P_ijᵀ ∘ (dP_ijᵀ − D_i)
        dK_j += dS_ijᵀ Q_i       and after the loop: dK_j = scale · dK_j

    Hidden means a query row past Nq or, when CAUSAL, key j > i + Nk − Nq (bottom-right aligned).

    Hints:
      1. Work with the transposed tile (B_c, B_r): rows are keys offs_n, columns are queries offs_m.
      2. L_i and D_i are vectors of the query block: broadcast them as L_i[None, :].
      3. Use tl.where(visible, tl.exp(...), 0.0): a row with L_i = −inf gives exp(+inf) where it is hidden.
      4. Cast P and dS to the inputs' dtype before tl.dot (p.to(do.dtype)); accumulate in float32.
    """
    raise NotImplementedError("ch07.dkdv_kernel: not implemented yet")


@triton.jit
def dq_kernel(Q, K, V, dO, dQ, L, Delta, Nq, Nk, scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ_i (B_r, d) of the query block i = tl.program_id(0) of head bh = tl.program_id(1).

    Load Q_i, dO_i, L_i, D_i once; loop over the key blocks j (BLOCK_N rows each), loading K_j, V_j:

        S_ij = scale · Q_i K_jᵀ       P_ij = exp(S_ij − L_i)   (0 where hidden)
        dS_ij = P_ij ∘ (dO_i V_jᵀ − D_i)       dQ_i += dS_ij K_j       and after the loop: dQ_i = scale · dQ_i

    Hidden means a key past Nk or, when CAUSAL, key j > i + Nk − Nq.

    Hints:
      1. The same tile as in the forward kernel, (B_r, B_c): broadcast L_i[:, None] and D_i[:, None].
      2. Load L_i with other=0.0 past Nq: those rows are never stored, but must not make NaNs in tl.dot.
      3. tl.dot(ds.to(k.dtype), k) accumulates in float32.
    """
    raise NotImplementedError("ch07.dq_kernel: not implemented yet")


def _prepare(q, k, v, o, lse, do, scale, BLOCK_M):
    """Given: contiguous inputs, the scale, and D from the preprocess kernel."""
    require_kernel_dtype(q, k, v, o, do)
    B, H, Nq, d = q.shape
    if d not in (16, 32, 64, 128):
        raise ValueError(f"these kernels take a head dim d of 16, 32, 64 or 128, got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    lse = lse.float().contiguous()
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    preprocess_kernel[(triton.cdiv(Nq, BLOCK_M), B * H)](o, do, delta, Nq, HEAD_DIM=d, BLOCK_M=BLOCK_M)
    return q, k, v, lse, do, delta, scale


def backward_dkdv(q, k, v, o, lse, do, causal: bool = False, scale=None, BLOCK_M: int = 16, BLOCK_N: int = 16):
    """Given launcher: (dk, dv) like (k, v). q, o, do (B, H, Nq, d); k, v (B, H, Nk, d); lse (B, H, Nq)."""
    require_implemented(dkdv_kernel)
    q, k, v, lse, do, delta, scale = _prepare(q, k, v, o, lse, do, scale, BLOCK_M)
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dkdv_kernel[(triton.cdiv(Nk, BLOCK_N), B * H)](q, k, v, do, dk, dv, lse, delta, Nq, Nk, scale,
                                                   HEAD_DIM=d, CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return dk, dv


def backward_dq(q, k, v, o, lse, do, causal: bool = False, scale=None, BLOCK_M: int = 16, BLOCK_N: int = 16):
    """Given launcher: dq like q. Same arguments as backward_dkdv."""
    require_implemented(dq_kernel)
    q, k, v, lse, do, delta, scale = _prepare(q, k, v, o, lse, do, scale, BLOCK_M)
    B, H, Nq, d = q.shape
    dq = torch.empty_like(q)
    dq_kernel[(triton.cdiv(Nq, BLOCK_M), B * H)](q, k, v, do, dq, lse, delta, Nq, k.shape[2], scale,
                                                 HEAD_DIM=d, CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return dq


def flash_attention_backward(q, k, v, o, lse, do, causal: bool = False, scale=None):
    """Given: (dq, dk, dv), both kernels."""
    dk, dv = backward_dkdv(q, k, v, o, lse, do, causal, scale)
    return backward_dq(q, k, v, o, lse, do, causal, scale), dk, dv
