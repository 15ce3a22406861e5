"""FlashAttention-2 backward in Triton: dQ, dK, dV rebuilt tile by tile from Q, K, V, O, L and dO.

P = softmax(S) is never stored: every kernel recomputes the tile P_ij = exp(S_ij − L_i) it needs from
the logsumexp L saved by the forward pass. Three kernels, as in FlashAttention-2 (Algorithm 2) and the
Triton fused-attention tutorial:

1. ``_preprocess``: D_i = rowsum(dO_i ∘ O_i), one float32 per query row.
2. ``_dkdv``: a program per key block j keeps K_j, V_j and the accumulators dK_j, dV_j on chip and
   walks over the query blocks i, and over every query head that reads this key/value head.
3. ``_dq``: a program per query block i keeps Q_i, dO_i and the accumulator dQ_i on chip and walks
   over the key blocks j.

Each output element is written by exactly one program, which sums its terms in a fixed order: no
atomics, so a second run gives bitwise the same result (whatever flash-attn's ``deterministic`` says).

Exponentials are taken in base 2 with log2(e) folded into one constant:
exp(scale · s − L) = exp2(log2e · scale · s − log2e · L), a fused multiply-add and an exp2 per score.
The factor ``scale`` of dS = ∂loss/∂(scale · QKᵀ) is applied once to the finished dQ_i and dK_j.
The score options come from ``scores.py``, as in the forward: the same window and the same block
skipping, soft-capping (whose backward multiplies dS by 1 − tanh²), ALiBi (a constant bias: no
gradient), and dropout, whose mask is regenerated from the forward's (seed, offset), never stored.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import check_attention_inputs, check_like
from .common import check_kernel_device, dot, dot_args, load_tile, store_tile, to_dtype
from .configs import PREPROCESS_BLOCK_M, KernelConfig, autotuned, launch, length_bucket
from .scores import LOG2E, dropout_keep, key_range, query_range, score_args, score_constants, scores
from .sequences import DENSE, Sequences, batch_strides, sequence_args, sequence_rows, sequence_shape


@triton.jit
def _preprocess(O, dO, Delta, stride_ob, stride_oh, stride_om, stride_od,
                stride_dob, stride_doh, stride_dom, stride_dod, H, Nq,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[b, h, i] = D_i = Σ_k dO_ik O_ik for one block of B_r query rows."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    O_i = load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Nq, HEAD_DIM)
    dO_i = load_tile(dO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Nq, HEAD_DIM)
    # D_i = rowsum(dO_i ∘ O_i)
    D_i = tl.sum(dO_i.to(tl.float32) * O_i.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * Nq + offs_m, D_i, mask=offs_m < Nq)


@triton.jit
def _row_stats(L_bh, Delta_bh, offs_m, Nq):
    """(log2e · L_i, D_i) of the rows offs_m.

    Rows past Nq, and rows that see no key (L_i = −inf), get L_i = +inf, so that their P_ij = 0
    wherever they meet a key (a row that sees no key only meets keys in masked blocks, but there the
    hidden scores are −inf, and −inf − (−inf) would be NaN).
    """
    L_i = tl.load(L_bh + offs_m, mask=offs_m < Nq, other=float("inf"))
    L_i = tl.where(L_i == float("-inf"), float("inf"), L_i)
    D_i = tl.load(Delta_bh + offs_m, mask=offs_m < Nq, other=0.0)
    return L_i * LOG2E, D_i


@triton.jit
def _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                stride_qm, stride_qd, stride_dom, stride_dod,
                start_n, lo, hi, bh, Nq, Nk, offset, Nq_max, Nk_max,
                qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MASK: tl.constexpr, LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add to dK_j, dV_j (B_c, d) the terms of query blocks lo, lo + B_r, ... < hi of one head.

    MASK: hide the pairs outside the window (blocks that cross its edges). Key rows past Nk need no
    mask: they only reach their own rows of dK_j and dV_j, which are never stored.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        QT_i = load_tile(Q_h, offs_d, offs_m, stride_qd, stride_qm, HEAD_DIM, Nq)  # Q_iᵀ (d, B_r)
        dO_i = load_tile(dO_h, offs_m, offs_d, stride_dom, stride_dod, Nq, HEAD_DIM)  # (B_r, d)
        L_i, D_i = _row_stats(L_h, Delta_h, offs_m, Nq)
        # S_ijᵀ = K_j Q_iᵀ (before scaling)                         (B_c, B_r)
        ST_ij = dot(K_j, QT_i, None, UPCAST, DOT_PRECISION)
        # the scores in base 2 are c · x (transposed tile: rows are keys, columns queries)
        xT, c, TT = scores(ST_ij, offs_m[None, :], offs_n[:, None], Nk, offset, qk_scale, left, right,
                           softcap_scale, softcap_log2, slope_log2, MASK, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI)
        # P_ijᵀ = exp(scale · S_ijᵀ − L_i) = exp2(log2e · scale · S_ijᵀ − log2e · L_i)
        PT_ij = tl.math.exp2(xT * c - L_i[None, :])
        if DROPOUT:
            keepT = dropout_keep(seed, philox_offset, bh, offs_m[None, :], offs_n[:, None], Nq_max, Nk_max, dropout_p)
            # the output saw P_ij ∘ Z_ij / (1 − p)
            PT_seen = tl.where(keepT, PT_ij * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            PT_seen = PT_ij
        # dV_j += P_ijᵀ dO_i                     (P_ij rounded to dO's dtype in dot)
        dV_j = dot(PT_seen, dO_i, dV_j, UPCAST, DOT_PRECISION)
        # dP_ijᵀ = V_j dO_iᵀ                                         (B_c, B_r)
        dPT_ij = dot(V_j, tl.trans(dO_i), None, UPCAST, DOT_PRECISION)
        if DROPOUT:
            # the gradient passes where the entry was kept, scaled as the entry was
            dPT_ij = tl.where(keepT, dPT_ij * (1.0 / (1.0 - dropout_p)), 0.0)
        # dS_ijᵀ = P_ijᵀ ∘ (dP_ijᵀ − D_i)
        dST_ij = PT_ij * (dPT_ij - D_i[None, :])
        if SOFTCAP:
            # through s = cap · tanh(scale · S / cap): ∂s / ∂(scale · S) = 1 − tanh²
            dST_ij = dST_ij * (1.0 - TT * TT)
        # dK_j += dS_ijᵀ Q_i                      (the factor scale comes once, at the end)
        dK_j = dot(dST_ij, tl.trans(QT_i), dK_j, UPCAST, DOT_PRECISION)
    return dK_j, dV_j


@triton.jit
def _dkdv_kernel(Q, K, V, dO, dK, dV, L, Delta,
          stride_qb, stride_qh, stride_qm, stride_qd,
          stride_kb, stride_kh, stride_kn, stride_kd,
          stride_vb, stride_vh, stride_vn, stride_vd,
          stride_dob, stride_doh, stride_dom, stride_dod,
          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
          stride_lb, stride_lh,
          H, Hkv, Nq_max, Nk_max, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K,
          SLOPES, stride_slope_b, stride_slope_h, RNG, scale, left, right, softcap_scale, softcap_log2, dropout_p,
          N_BUCKET,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
          LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
          DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK_j, dV_j (B_c, d) of one key block j of one key/value head of one sequence, summed over its query heads.

    Grid: (cdiv(Nk_max, B_c), B · Hkv). dK and dV have the same strides; L and Delta the strides
    stride_lb, stride_lh with rows of stride 1. The sequences' rows: ``sequences.py``.
    """
    start_n = tl.program_id(0) * BLOCK_N
    b, hkv = (tl.program_id(1) // Hkv).to(tl.int64), (tl.program_id(1) % Hkv).to(tl.int64)
    # this program's sequence: query rows q_start .. q_start + Nq − 1 and key rows k_start .. k_start + Nk − 1
    # (sequences.py); the queries are the last Nq positions: offset = Nk − Nq
    q_start, Nq, k_start, Nk = sequence_rows(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K, None, Nq_max, Nk_max)
    if start_n >= Nk:  # past the end of a sequence shorter than the longest
        return
    offset = Nk - Nq
    q_start = tl.cast(q_start, tl.int64)
    k_start = tl.cast(k_start, tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K_j = load_tile(K + b * stride_kb + hkv * stride_kh + k_start * stride_kn, offs_n, offs_d, stride_kn, stride_kd,
                    Nk, HEAD_DIM)
    V_j = load_tile(V + b * stride_vb + hkv * stride_vh + k_start * stride_vn, offs_n, offs_d, stride_vn, stride_vd,
                    Nk, HEAD_DIM)
    dK_j = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dV_j = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # query blocks [mid_lo, mid_hi) see the whole key block; [lo, mid_lo) cross the window's right edge
    # (the causal diagonal), [mid_hi, hi) its left edge; the others see none of it and are skipped
    lo, mid_lo, mid_hi, hi = query_range(start_n, Nq, offset, left, right, BLOCK_M, BLOCK_N, LEFT_LIMIT, RIGHT_LIMIT)
    group = H // Hkv
    for g in range(group):  # query head h = hkv · H/Hkv + g reads this key/value head
        h = hkv * group + g
        Q_h = Q + b * stride_qb + h * stride_qh + q_start * stride_qm
        dO_h = dO + b * stride_dob + h * stride_doh + q_start * stride_dom
        L_h = L + b * stride_lb + h * stride_lh + q_start
        Delta_h = Delta + b * stride_lb + h * stride_lh + q_start
        qk_scale, slope_log2, seed, philox_offset = score_constants(SLOPES, stride_slope_b, stride_slope_h, RNG,
                                                                    b, h, scale, ALIBI, DROPOUT)
        if RIGHT_LIMIT:
            dK_j, dV_j = _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     start_n, lo, mid_lo, b * H + h, Nq, Nk, offset, Nq_max, Nk_max,
                                     qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p,
                                     seed, philox_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                                     True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, UPCAST, DOT_PRECISION)
        dK_j, dV_j = _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 start_n, mid_lo, mid_hi, b * H + h, Nq, Nk, offset, Nq_max, Nk_max,
                                 qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p,
                                 seed, philox_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                                 False, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, UPCAST, DOT_PRECISION)
        if LEFT_LIMIT:
            dK_j, dV_j = _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     start_n, mid_hi, hi, b * H + h, Nq, Nk, offset, Nq_max, Nk_max,
                                     qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p,
                                     seed, philox_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                                     True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, UPCAST, DOT_PRECISION)
    # dK_j = scale · Σ_i dS_ijᵀ Q_i
    dK_j *= scale
    out = b * stride_dkb + hkv * stride_dkh + k_start * stride_dkn
    store_tile(dK + out, to_dtype(dK_j, dK.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd, Nk, HEAD_DIM)
    store_tile(dV + out, to_dtype(dV_j, dV.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd, Nk, HEAD_DIM)


@triton.jit
def _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
              start_m, lo, hi, bh, Nk, offset, Nq_max, Nk_max,
              qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add to dQ_i (B_r, d) the terms of key blocks lo, lo + B_c, ... < hi.

    MASK: hide the keys outside the window and past Nk (the ragged last block).
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        KT_j = load_tile(K_h, offs_d, offs_n, stride_kd, stride_kn, HEAD_DIM, Nk)  # K_jᵀ (d, B_c)
        VT_j = load_tile(V_h, offs_d, offs_n, stride_vd, stride_vn, HEAD_DIM, Nk)  # V_jᵀ (d, B_c)
        # S_ij = Q_i K_jᵀ (before scaling)                          (B_r, B_c)
        S_ij = dot(Q_i, KT_j, None, UPCAST, DOT_PRECISION)
        # the scores in base 2 are c · x
        x, c, T = scores(S_ij, offs_m[:, None], offs_n[None, :], Nk, offset, qk_scale, left, right,
                         softcap_scale, softcap_log2, slope_log2, MASK, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI)
        # P_ij = exp(scale · S_ij − L_i) = exp2(log2e · scale · S_ij − log2e · L_i)
        P_ij = tl.math.exp2(x * c - L_i[:, None])
        # dP_ij = dO_i V_jᵀ
        dP_ij = dot(dO_i, VT_j, None, UPCAST, DOT_PRECISION)
        if DROPOUT:
            # the gradient passes where the entry was kept, scaled as the entry was
            keep = dropout_keep(seed, philox_offset, bh, offs_m[:, None], offs_n[None, :], Nq_max, Nk_max, dropout_p)
            dP_ij = tl.where(keep, dP_ij * (1.0 / (1.0 - dropout_p)), 0.0)
        # dS_ij = P_ij ∘ (dP_ij − D_i)
        dS_ij = P_ij * (dP_ij - D_i[:, None])
        if SOFTCAP:
            # through s = cap · tanh(scale · S / cap): ∂s / ∂(scale · S) = 1 − tanh²
            dS_ij = dS_ij * (1.0 - T * T)
        # dQ_i += dS_ij K_j                       (the factor scale comes once, at the end)
        dQ_i = dot(dS_ij, tl.trans(KT_j), dQ_i, UPCAST, DOT_PRECISION)
    return dQ_i


@triton.jit
def _dq_kernel(Q, K, V, dO, dQ, L, Delta,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        stride_lb, stride_lh,
        H, Hkv, Nq_max, Nk_max, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K,
        SLOPES, stride_slope_b, stride_slope_h, RNG, scale, left, right, softcap_scale, softcap_log2, dropout_p,
        N_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
        DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ_i (B_r, d) of one query block i of one head of one sequence. Grid: (cdiv(Nq_max, B_r), B · H)."""
    # causal: the last query blocks see the most keys, so they are started first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)
    # this program's sequence: query rows q_start .. q_start + Nq − 1 and key rows k_start .. k_start + Nk − 1
    # (sequences.py); key/value head h // (H / Hkv); the queries are the last Nq positions
    q_start, Nq, k_start, Nk = sequence_rows(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K, None, Nq_max, Nk_max)
    if start_m >= Nq:  # past the end of a sequence shorter than the longest
        return
    hkv = h // (H // Hkv)
    offset = Nk - Nq
    q_start = tl.cast(q_start, tl.int64)
    k_start = tl.cast(k_start, tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q_i = load_tile(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, offs_m, offs_d, stride_qm, stride_qd,
                    Nq, HEAD_DIM)
    dO_i = load_tile(dO + b * stride_dob + h * stride_doh + q_start * stride_dom, offs_m, offs_d, stride_dom,
                     stride_dod, Nq, HEAD_DIM)
    rows = b * stride_lb + h * stride_lh + q_start
    L_i, D_i = _row_stats(L + rows, Delta + rows, offs_m, Nq)
    K_h = K + b * stride_kb + hkv * stride_kh + k_start * stride_kn
    V_h = V + b * stride_vb + hkv * stride_vh + k_start * stride_vn
    qk_scale, slope_log2, seed, philox_offset = score_constants(SLOPES, stride_slope_b, stride_slope_h, RNG, b, h,
                                                                scale, ALIBI, DROPOUT)
    # key blocks [mid_lo, mid_hi) are seen whole by every row of the block; [lo, mid_lo) and [mid_hi, hi)
    # need the mask; the others are never visited
    lo, mid_lo, mid_hi, hi = key_range(start_m, Nk, offset, left, right, BLOCK_M, BLOCK_N, LEFT_LIMIT, RIGHT_LIMIT)
    dQ_i = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if LEFT_LIMIT:
        dQ_i = _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
                         start_m, lo, mid_lo, b * H + h, Nk, offset, Nq_max, Nk_max,
                         qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
                         HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                         True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, UPCAST, DOT_PRECISION)
    dQ_i = _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
                     start_m, mid_lo, mid_hi, b * H + h, Nk, offset, Nq_max, Nk_max,
                     qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                     False, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, UPCAST, DOT_PRECISION)
    dQ_i = _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
                     start_m, mid_hi, hi, b * H + h, Nk, offset, Nq_max, Nk_max,
                     qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                     True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, UPCAST, DOT_PRECISION)
    # dQ_i = scale · Σ_j dS_ij K_j
    dQ_i *= scale
    store_tile(dQ + b * stride_dqb + h * stride_dqh + q_start * stride_dqm, to_dtype(dQ_i, dQ.dtype.element_ty),
               offs_m, offs_d, stride_dqm, stride_dqd, Nq, HEAD_DIM)


# the kernels behind the autotuner (``_dkdv_kernel`` and ``_dq_kernel`` run a pinned configuration)
_dkdv = autotuned("dkdv", _dkdv_kernel)
_dq = autotuned("dq", _dq_kernel)


def attention_backward(q, k, v, o, lse, do, *, causal: bool, scale: float, window_size=(-1, -1),
                       softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                       rng_state: Optional[torch.Tensor] = None, dkdv_config: Optional[KernelConfig] = None,
                       dq_config: Optional[KernelConfig] = None, sequences: Sequences = DENSE):
    """Gradients (dq, dk, dv) of O = softmax(scale · Q Kᵀ) V, from the forward's O and logsumexp L.

    q, o, do: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with H % Hkv == 0; lse: (B, H, Nq), the
    natural-log logsumexp of the scaled scores (−inf for a row that sees no key). Causal masking is
    bottom-right aligned. Any strides. The score options must be those of the forward call (the
    same ``rng_state`` regenerates its dropout mask). Returns dq like q and dk, dv like k, v
    (contiguous, input dtype; dk, dv summed over the H / Hkv query heads of each key/value head).
    ``sequences``: the forward's packed layout (``attention_forward``; rows of no sequence get zero
    gradients); a paged cache has no backward.
    ``dkdv_config`` / ``dq_config`` (or FLASHCOURSE_CONFIG_DKDV / _DQ) pin the launch configurations.
    """
    if sequences.paged:
        raise NotImplementedError("a paged KV cache (block_table) has no backward pass, as in flash-attn: "
                                  "call it under torch.no_grad(), or pass contiguous k, v to train")
    Bt, H, Hkv, Nt, _, d = check_attention_inputs(q, k, v)
    check_like("o", o, q, "q")
    check_like("do", do, q, "q")
    if tuple(lse.shape) != (Bt, H, Nt):
        raise ValueError(f"lse must have shape (B, H, Nq) = {(Bt, H, Nt)}, got {tuple(lse.shape)}")
    check_kernel_device(q=q, k=k, v=v, o=o, lse=lse, do=do)
    B, Nq, Nk = sequence_shape(q, k, sequences)
    packed_q, packed_k = sequences.cu_seqlens_q is not None, sequences.cu_seqlens_k is not None
    lse = lse.to(torch.float32).contiguous()
    BLOCK_D = max(16, triton.next_power_of_2(d))
    delta = torch.empty((Bt, H, Nt), dtype=torch.float32, device=q.device)
    # packed rows that belong to no sequence get no gradient
    dq = (torch.zeros if packed_q else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    dk = (torch.zeros if packed_k else torch.empty)(k.shape, dtype=k.dtype, device=k.device)
    dv = (torch.zeros if packed_k else torch.empty)(v.shape, dtype=v.dtype, device=v.device)

    # D_i = rowsum(dO_i ∘ O_i) needs no sequence: every row of the (packed) batch at once
    launch("preprocess", _preprocess, None, lambda bm, bn: (triton.cdiv(Nt, bm), Bt * H),
           (o, do, delta, *o.stride(), *do.stride(), H, Nt), dict(HEAD_DIM=d, BLOCK_D=BLOCK_D),
           KernelConfig(PREPROCESS_BLOCK_M, 1))
    options, flags = score_args(q, Nq, Nk, scale=scale, causal=causal, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state)
    inputs = (*batch_strides(q, packed_q), *batch_strides(k, packed_k), *batch_strides(v, packed_k),
              *batch_strides(do, packed_q))
    tail = (*batch_strides(lse, packed_q)[:2], H, Hkv, Nq, Nk, *sequence_args(sequences, k)[:4], *options,
            length_bucket(max(Nq, Nk)))
    meta = dict(HEAD_DIM=d, BLOCK_D=BLOCK_D, **dot_args(q.dtype), **flags)
    launch("dkdv", _dkdv_kernel, _dkdv, lambda bm, bn: (triton.cdiv(Nk, bn), B * Hkv),
           (q, k, v, do, dk, dv, lse, delta, *inputs, *batch_strides(dk, packed_k), *tail), meta, dkdv_config)
    launch("dq", _dq_kernel, _dq, lambda bm, bn: (triton.cdiv(Nq, bm), B * H),
           (q, k, v, do, dq, lse, delta, *inputs, *batch_strides(dq, packed_q), *tail), meta, dq_config)
    return dq, dk, dv
