"""The FlashAttention forward kernel in Triton (FlashAttention-2, the fused-attention tutorial's layout).

One program computes one block Q_i of B_r query rows of one (batch, head): it streams the key and
value blocks K_j, V_j of B_c rows past Q_i, keeping the running row maximum m_i, the running sum l_i
and the unnormalised output acc_i in registers, and writes O_i = acc_i / l_i and the logsumexp L_i
once at the end. The grid is (⌈Nq / B_r⌉, B · H).

Two tricks of the tutorial:
- base 2: exp(x) = 2^(x · log2 e), so log2 e is folded into the softmax scale once and the loop
  uses ``exp2``; the stored L is converted back to the natural log, which the backward pass expects;
- block skipping: key blocks a query block cannot see (above the causal diagonal, outside a sliding
  window) are never visited, key blocks every row sees in full run without any mask, and only the
  few blocks that cross an edge of the window (the diagonal, or the ragged end of the keys) are
  masked. The key loop is therefore split into masked and unmasked parts (``scores.key_range``).

The score options (window, soft-capping, ALiBi, dropout) come from ``scores.py``: each is a
compile-time flag, absent from the compiled kernel when off.

FP8 (``FP8``, Hopper and Ada; the host side is ``flashcourse/fp8.py``): q, k and v in e4m3 with
float32 descale factors, one per block of ``SCALE_BLOCK`` rows (or one per tensor), and v stored
key-major (Vᵀ in memory: FP8 ``wgmma`` operands must have the reduction axis contiguous). Both
products run on FP8 tensor cores with float32 accumulation; the descale factors cost one scalar per
tile (``_attn_fwd_inner``) and P̃ is rounded to e4m3 before P̃ V, scaled by 2⁸ (``P_SHIFT``).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import INTERPRET
from ..fp8 import SCALE_BLOCK as _SCALE_BLOCK
from .common import check_kernel_device, dot, dot_args, load_tile, store_tile, to_dtype
from .configs import INTERPRET_CONFIGS, KernelConfig, autotuned, launch, length_bucket, pinned, tma_compatible
from .scores import dropout_keep, key_range, score_args, score_constants, scores
from .sequences import (DENSE, Sequences, batch_strides, kv_head, paged_offsets, sequence_args, sequence_rows,
                        sequence_shape)
from .splitkv import merge_splits, split_range

LN_2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln 2 = 1 / log2(e)
MAX_HEAD_DIM = 256
# the probabilities returned for inspection are padded to multiples of 128, as flash-attn's are
PROBS_PADDING = 128
# FP8: rows (tokens) that share one descale factor (flashcourse.fp8); tiles of B_r, B_c dividing it
SCALE_BLOCK: tl.constexpr = tl.constexpr(_SCALE_BLOCK)
# FP8: P̃_ij = 2^(s − m) ∈ [0, 1] is rounded to e4m3 as P̃_ij · 2⁸ ∈ [0, 256]: e4m3's normal numbers
# then reach down to weights of 2⁻¹⁴ instead of 2⁻⁶ (below that: subnormals, 2⁻⁹ apart, then 0).
# Free: 8 is subtracted from the row maximum, and l_i carries the same factor, which O = acc / l cancels
P_SHIFT: tl.constexpr = tl.constexpr(8.0)


@triton.jit
def _load_kv_tile(
    src, pages, start_n, cols, stride_row, stride_col, stride_page, k_start, page_size, Nk,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr,
    KEY_MAJOR: tl.constexpr,
):
    """The (B_c, BLOCK_D) tile K_j or V_j starting at key start_n, zero past Nk and past HEAD_DIM.

    ``src`` is a tensor descriptor (USE_TMA: Hopper's copy engine fetches the tile and fills what lies
    outside the (Nk, HEAD_DIM) matrix with zeros) or the head's base pointer (masked only where needed).
    ``pages``: the sequence's row of a paged cache's block table (``sequences.paged_offsets``), or None.
    KEY_MAJOR: the matrix is stored transposed, (HEAD_DIM, Nk) with the keys contiguous (FP8's V); the
    descriptor then fetches the tile Vᵀ_j (the pointer loads follow the strides either way).
    """
    if USE_TMA:
        # (one return per branch: Triton 3.6 type-checks a return that follows a compile-time if)
        if KEY_MAJOR:
            # V_j = (Vᵀ_j)ᵀ: transposing a tile in shared memory only changes how it is read
            tile = tl.trans(src.load([0, start_n]))
        else:
            tile = src.load([start_n, 0])
        return tile
    else:
        rows = start_n + tl.arange(0, BLOCK_N)
        if pages is not None:
            offs = paged_offsets(pages, rows, k_start, Nk, page_size, stride_page, stride_row)
            mask = (rows[:, None] < Nk) & (cols[None, :] < HEAD_DIM)
            return tl.load(src + offs[:, None] + cols[None, :] * stride_col, mask=mask, other=0.0)
        elif MASK_ROWS or HEAD_DIM != cols.shape[0]:
            return load_tile(src, rows, cols, stride_row, stride_col, Nk, HEAD_DIM)
        else:
            return tl.load(src + rows[:, None] * stride_row + cols[None, :] * stride_col)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, v_descale, q, q_descale, K_DESCALE, V_DESCALE,
    K_src, V_src, pages, stride_kn, stride_kd, stride_vn, stride_vd, stride_kb, stride_vb, k_start, page_size,
    offs_m, offs_d, start, end, bh, Nk, offset, Nq_max, Nk_max,
    qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
    MASKED: tl.constexpr, LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    FP8: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Fold the key blocks K_j, V_j with start <= j·B_c < end into (acc, l_i, m_i, v_descale).

    m_i and the scores are in base-2 units (scaled by log2 e). MASKED blocks hide the keys outside
    the window and past Nk (``scores``); the others are seen whole by every row.
    FP8: q_descale is δ_q of Q_i; K_DESCALE, V_DESCALE point at this head's δ_k, δ_v (one per
    SCALE_BLOCK keys); acc_i is kept as O_i-so-far / δ_v of the last block, v_descale (1.0 otherwise).
    WARP_SPECIALIZE asks Triton to split the loop into warps that load and warps that compute (an
    experiment, off by default).
    """
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if FP8:
            # δ_k, δ_v of this block (B_c divides SCALE_BLOCK: one number each), asked for first so that
            # their latency hides behind Q_i K_jᵀ
            k_descale_j = tl.load(K_DESCALE + start_n // SCALE_BLOCK)
            v_descale_j = tl.load(V_DESCALE + start_n // SCALE_BLOCK)
        K_j = _load_kv_tile(K_src, pages, start_n, offs_d, stride_kn, stride_kd, stride_kb, k_start, page_size, Nk,
                            HEAD_DIM, BLOCK_N, MASKED, USE_TMA, False)
        # S_ij = Q_i K_jᵀ                                        (B_r, B_c), float32
        s = dot(q, tl.trans(K_j), None, UPCAST, DOT_PRECISION)
        if FP8:
            # S_ij = δ_q δ_k(j) · Q₈_i K₈_jᵀ: one number per tile, which joins the softmax's scale, so the
            # float32 tile is never multiplied by it on its own
            descale = q_descale * k_descale_j
            tile_scale = qk_scale * descale
            tile_softcap_scale = softcap_scale * descale
        else:
            tile_scale = qk_scale
            tile_softcap_scale = softcap_scale
        # the scores in base 2 are c · x: scale, soft-cap, ALiBi, window (−inf where hidden)
        x, c, _ = scores(s, offs_m[:, None], offs_n[None, :], Nk, offset, tile_scale, left, right,
                         tile_softcap_scale, softcap_log2, slope_log2, MASKED, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP,
                         ALIBI)
        # m_new = max(m_i, rowmax(S_ij) · scale · log2 e)
        m_new = tl.maximum(m_i, tl.max(x, 1) * c)
        if MASKED:
            # a row that has seen no key yet keeps m = −inf; subtract 0 instead (exp2(−inf) = 0, not NaN)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        if FP8:
            # P̃_ij · 2⁸ = 2^(S_ij · scale · log2 e − (m_new − 8)) ∈ [0, 256], rounded to e4m3 by the dot below
            p = tl.math.exp2(x * c - (m_new_safe - P_SHIFT)[:, None])
        else:
            # P̃_ij = 2^(S_ij · scale · log2 e − m_new)          (= exp(scale·S_ij − m_new / log2 e))
            p = tl.math.exp2(x * c - m_new_safe[:, None])
        # α = 2^(m_i − m_new): how much the old sums shrink under the new maximum
        alpha = tl.math.exp2(m_i - m_new_safe)
        # l_i = α l_i + rowsum(P̃_ij)                          (dropout does not change the softmax)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            # P̃_ij ∘ Z_ij: the dropped entries leave the product with V (1 / (1 − p) comes at the end)
            keep = dropout_keep(seed, philox_offset, bh, offs_m[:, None], offs_n[None, :], Nq_max, Nk_max, dropout_p)
            p = tl.where(keep, p, 0.0)
        V_j = _load_kv_tile(V_src, pages, start_n, offs_d, stride_vn, stride_vd, stride_vb, k_start, page_size, Nk,
                            HEAD_DIM, BLOCK_N, MASKED, USE_TMA, FP8)
        if FP8:
            # O_i = Σ_j δ_v(j) P̃_ij V₈_j, kept as acc_i = O_i / δ_v(j) of the latest block j: the
            # ratio of the old and new descale factors rides along with α
            alpha = alpha * (v_descale / v_descale_j)
            v_descale = v_descale_j
        # acc_i = α acc_i + P̃_ij V_j             (P̃_ij rounded to V's dtype; still unnormalised)
        acc = dot(p, V_j, acc * alpha[:, None], UPCAST, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i, v_descale


@triton.jit
def _store_probs(
    P_head, stride_pm, stride_pn, q, K_head, pages, stride_kn, stride_kd, stride_kb, k_start, page_size, m_i,
    offs_m, offs_d, start, end, bh, Nq, Nk, offset, Nq_max, Nk_max,
    qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
    LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """For inspection only: write P̃_ij = exp(s_ij − m_i), m_i the row maximum, of the key blocks in
    [start, end), negated where the dropout drops the entry (flash-attn's S_dmask convention)."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        K_j = _load_kv_tile(K_head, pages, start_n, offs_d, stride_kn, stride_kd, stride_kb, k_start, page_size, Nk,
                            HEAD_DIM, BLOCK_N, True, False, False)
        s = dot(q, tl.trans(K_j), None, UPCAST, DOT_PRECISION)
        x, c, _ = scores(s, offs_m[:, None], offs_n[None, :], Nk, offset, qk_scale, left, right,
                         softcap_scale, softcap_log2, slope_log2, True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI)
        # P̃_ij = 2^(x · c − m_i)
        p = tl.math.exp2(x * c - m_safe[:, None])
        if DROPOUT:
            keep = dropout_keep(seed, philox_offset, bh, offs_m[:, None], offs_n[None, :], Nq_max, Nk_max, dropout_p)
            p = tl.where(keep, p, -p)
        store_tile(P_head, to_dtype(p, P_head.dtype.element_ty), offs_m, offs_n, stride_pm, stride_pn, Nq, Nk)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, L, P,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_os, stride_ls,
    stride_pb, stride_ph, stride_pm, stride_pn,
    H, GROUP, Nq_max, Nk_max,
    CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K, BLOCK_TABLE, stride_table, page_size,
    SLOPES, stride_slope_b, stride_slope_h, RNG, scale, left, right, softcap_scale, softcap_log2, dropout_p,
    Q_DESCALE, K_DESCALE, V_DESCALE,
    N_BUCKET, TMA_MODE,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, RETURN_PROBS: tl.constexpr, FP8: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O_i, L_i for one block of B_r = BLOCK_M query rows of one (sequence, head), over one split of its keys.

    The grid is (⌈Nq_max / B_r⌉, B · H, splits). Which rows a sequence owns is described in
    ``sequences.py`` (CU_SEQLENS_Q .. page_size: None for a dense batch); the score options
    (SLOPES .. dropout_p) in ``scores.score_args``. L has rows of stride 1 (strides stride_lb,
    stride_lh). With several splits, program (·, ·, s) writes its partial O_i, L_i at O + s · stride_os,
    L + s · stride_ls (``splitkv.py`` merges them). P receives the unnormalised probabilities when
    RETURN_PROBS. N_BUCKET and TMA_MODE are read only by the autotuner (its key); USE_TMA loads K_j,
    V_j through tensor descriptors; WARP_SPECIALIZE warp-specializes the key loops (an experiment).

    FP8 (dense batches, one split): Q, K, V in e4m3, V key-major (stride_vn = 1); Q_DESCALE (B, H,
    ⌈Nq / SCALE_BLOCK⌉), K_DESCALE and V_DESCALE (B, Hkv, ⌈Nk / SCALE_BLOCK⌉), contiguous float32
    (``flashcourse.fp8``). None otherwise.
    """
    pid_m = tl.program_id(0)
    if RIGHT_LIMIT:
        # causal: the last query blocks see the most keys: start them first so that the tail of the grid is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    # this program's sequence: query rows q_start .. q_start + Nq − 1 and key rows k_start ..
    # k_start + Nk − 1 (sequences.py); grouped-query attention reads key/value head h // (H / Hkv);
    # the queries are the last Nq positions: offset = Nk − Nq
    q_start, Nq, k_start, Nk = sequence_rows(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K, BLOCK_TABLE,
                                             Nq_max, Nk_max)
    start_m = pid_m * BLOCK_M
    if start_m >= Nq:  # past the end of a sequence shorter than the longest
        return
    h_kv = h // GROUP
    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + tl.cast(q_start, tl.int64) * stride_qm
    K_head = kv_head(K, b, h_kv, k_start, stride_kb, stride_kh, stride_kn, BLOCK_TABLE)
    V_head = kv_head(V, b, h_kv, k_start, stride_vb, stride_vh, stride_vn, BLOCK_TABLE)
    if BLOCK_TABLE is not None:  # a paged cache: the sequence's row of the block table
        pages = BLOCK_TABLE + b.to(tl.int64) * stride_table
    else:
        pages = BLOCK_TABLE
    split = tl.program_id(2)
    O_head = (O + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + tl.cast(q_start, tl.int64) * stride_om)
    L_head = L + split.to(tl.int64) * stride_ls + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    offset = Nk - Nq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    # the head dim is padded to BLOCK_D, a power of two; columns >= HEAD_DIM are masked to zero
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q_head, offs_m, offs_d, stride_qm, stride_qd, Nq, HEAD_DIM)

    if USE_TMA:
        # K and V of this head as (Nk, d) matrices for the copy engine (row stride 16-byte aligned, d stride 1)
        K_src = tl.make_tensor_descriptor(K_head, [tl.maximum(Nk, 1), HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        if FP8:  # V key-major: Vᵀ, a (d, Nk) matrix with the keys contiguous
            V_src = tl.make_tensor_descriptor(V_head, [HEAD_DIM, tl.maximum(Nk, 1)], [stride_vd, 1],
                                              [BLOCK_D, BLOCK_N])
        else:
            V_src = tl.make_tensor_descriptor(V_head, [tl.maximum(Nk, 1), HEAD_DIM], [stride_vn, 1],
                                              [BLOCK_N, BLOCK_D])
    else:
        K_src = K_head
        V_src = V_head

    qk_scale, slope_log2, seed, philox_offset = score_constants(SLOPES, stride_slope_b, stride_slope_h, RNG, b, h,
                                                                scale, ALIBI, DROPOUT)

    # m_i = −inf, l_i = 0, acc_i = 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    v_descale = 1.0
    if FP8:
        tl.static_assert(SCALE_BLOCK % BLOCK_M == 0)
        tl.static_assert(SCALE_BLOCK % BLOCK_N == 0)
        # this head's descale factors: Q_i lies in one block of SCALE_BLOCK rows, so δ_q is one number
        q_descale = tl.load(Q_DESCALE + pid_bh.to(tl.int64) * tl.cdiv(Nq_max, SCALE_BLOCK) + start_m // SCALE_BLOCK)
        kv_blocks = (b * (H // GROUP) + h_kv).to(tl.int64) * tl.cdiv(Nk_max, SCALE_BLOCK)
        K_DESCALE = K_DESCALE + kv_blocks
        V_DESCALE = V_DESCALE + kv_blocks
    else:
        q_descale = 1.0

    # keys in whole blocks that every row sees need no mask: [mid_lo, mid_hi); blocks outside [lo, hi)
    # are never visited; [lo, mid_lo) cross the window's left edge, [mid_hi, hi) its right edge (the
    # causal diagonal) or the ragged end of the keys
    lo, mid_lo, mid_hi, hi = key_range(start_m, Nk, offset, left, right, BLOCK_M, BLOCK_N, LEFT_LIMIT, RIGHT_LIMIT)
    # split-KV: this program visits only its share of [lo, hi) (all of it when there is one split)
    lo, mid_lo, mid_hi, hi = split_range(lo, mid_lo, mid_hi, hi, split, tl.num_programs(2), BLOCK_N)
    if LEFT_LIMIT:
        acc, l_i, m_i, v_descale = _attn_fwd_inner(
            acc, l_i, m_i, v_descale, q, q_descale, K_DESCALE, V_DESCALE,
            K_src, V_src, pages, stride_kn, stride_kd, stride_vn, stride_vd, stride_kb, stride_vb,
            k_start, page_size, offs_m, offs_d, lo, mid_lo, pid_bh, Nk, offset, Nq_max, Nk_max,
            qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
            True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT,
            HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA, FP8, WARP_SPECIALIZE,
        )
    acc, l_i, m_i, v_descale = _attn_fwd_inner(
        acc, l_i, m_i, v_descale, q, q_descale, K_DESCALE, V_DESCALE,
        K_src, V_src, pages, stride_kn, stride_kd, stride_vn, stride_vd, stride_kb, stride_vb,
        k_start, page_size, offs_m, offs_d, mid_lo, mid_hi, pid_bh, Nk, offset, Nq_max, Nk_max,
        qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
        False, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT,
        HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA, FP8, WARP_SPECIALIZE,
    )
    acc, l_i, m_i, v_descale = _attn_fwd_inner(
        acc, l_i, m_i, v_descale, q, q_descale, K_DESCALE, V_DESCALE,
        K_src, V_src, pages, stride_kn, stride_kd, stride_vn, stride_vd, stride_kb, stride_vb,
        k_start, page_size, offs_m, offs_d, mid_hi, hi, pid_bh, Nk, offset, Nq_max, Nk_max,
        qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
        True, LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT,
        HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA, FP8, WARP_SPECIALIZE,
    )

    # O_i = acc_i / l_i, one division at the end; a row that saw no key (l_i = 0) gets O_i = 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if DROPOUT:
        # O_i = (P_i ∘ Z_i) V / (1 − p): the kept entries are scaled up so that E[O_i] stays the same
        o = acc * (1.0 / ((1.0 - dropout_p) * l_safe))[:, None]
    else:
        o = acc / l_safe[:, None]
    if FP8:
        # O_i = δ_v · acc_i / l_i, δ_v of the last key block (_attn_fwd_inner); the 2⁸ of P̃ cancels in acc / l
        o = o * v_descale
    store_tile(O_head, to_dtype(o, O.dtype.element_ty), offs_m, offs_d, stride_om, stride_od, Nq, HEAD_DIM)
    # L_i = ln 2 · (m_i + log2 l_i), natural log again; −inf for a row that saw no key (m_i = −inf)
    if FP8:
        # l_i summed P̃ · 2⁸
        lse = (m_i - P_SHIFT + tl.math.log2(l_safe)) * LN_2
    else:
        lse = (m_i + tl.math.log2(l_safe)) * LN_2
    tl.store(L_head + offs_m, lse, mask=offs_m < Nq)

    if RETURN_PROBS:
        P_head = P + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
        _store_probs(
            P_head, stride_pm, stride_pn, q, K_head, pages, stride_kn, stride_kd, stride_kb, k_start, page_size, m_i,
            offs_m, offs_d, lo, hi, pid_bh, Nq, Nk, offset, Nq_max, Nk_max,
            qk_scale, left, right, softcap_scale, softcap_log2, slope_log2, dropout_p, seed, philox_offset,
            LEFT_LIMIT, RIGHT_LIMIT, SOFTCAP, ALIBI, DROPOUT, HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION,
        )


_attn_fwd_tuned = autotuned("forward", _attn_fwd_kernel, extra_key=["TMA_MODE", "RETURN_PROBS"])
# the same kernel for a few query rows (decoding), with its own candidates (configs.CANDIDATES["decode"])
_attn_fwd_decode_tuned = autotuned("decode", _attn_fwd_kernel, extra_key=["TMA_MODE", "RETURN_PROBS"])


def _check_fp8_launch(q, k, v, descale, sequences, num_splits, return_probs, decode):
    """What the FP8 kernel takes (``flashcourse.fp8`` prepares it): e4m3 q, k, v with v key-major,
    float32 descale factors per block of SCALE_BLOCK rows, a dense batch, one split, no P̃."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"FP8 attention takes q, k and v all in torch.float8_e4m3fn, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if v.stride(2) != 1:
        raise ValueError("FP8 attention reads v key-major (stride 1 along the keys): pass "
                         "flashcourse.fp8.keys_contiguous(v)")
    if sequences != DENSE or num_splits > 1 or return_probs or decode:
        raise ValueError("FP8 attention runs dense batches in one split, without returned probabilities")
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    blocks = [triton.cdiv(n, _SCALE_BLOCK) for n in (Nq, Nk, Nk)]
    want = [(B, H, blocks[0]), (B, Hkv, blocks[1]), (B, Hkv, blocks[2])]
    if descale is None or len(descale) != 3 or any(
            not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != w
            for t, w in zip(descale, want)):
        raise ValueError(f"FP8 attention needs descale = (q_descale, k_descale, v_descale), float32 tensors of "
                         f"shapes {want} (one factor per {_SCALE_BLOCK} rows; flashcourse.fp8.quantize makes them)")


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global memory in which a kernel writes the descriptors it makes (Triton asks for it on a GPU)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    out: Optional[torch.Tensor] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    return_probs: bool = False,
    use_tma: Optional[bool] = None,
    config: Optional[KernelConfig] = None,
    sequences: Sequences = DENSE,
    num_splits: int = 1,
    decode: bool = False,
    descale: Optional[tuple] = None,
    out_dtype: Optional[torch.dtype] = None,
):
    """Launch the forward kernel. q (B, H, Nq, d), k, v (B, Hkv, Nk, d), any strides -> (O, L).

    O is (B, H, Nq, d) in q's dtype, contiguous (written into ``out`` when given, with any strides);
    L is the natural-log logsumexp of each score row, float32 (B, H, Nq), contiguous, −inf for a row
    that sees no key. The inputs are assumed valid (``flashcourse.flash_attention`` checks them).

    Score options (``scores.py``): ``window_size`` (left, right), −1 for no limit, measured from the
    bottom-right diagonal (``causal`` sets right = 0); ``softcap`` > 0; ``alibi_slopes`` float32 (H,)
    or (B, H); ``dropout_p`` with ``rng_state`` (``scores.new_rng_state``). ``return_probs`` also
    returns P̃ (B, H, Nq', Nk') in q's dtype, Nq and Nk rounded up to multiples of 128: exp(s_ij − m_i)
    with m_i the row maximum, negated where dropped, 0 where hidden and in the padding.

    ``sequences`` (``sequences.Sequences``): where each sequence's rows are. Packed queries
    (``cu_seqlens_q``): q is (1, H, total_q, d), O too, L (1, H, total_q) (rows of no sequence: O = 0,
    L = −inf); B, the ALiBi slopes' B and P̃'s are then the number of sequences, and Nq its
    ``max_seqlen_q`` (the same for the keys). Paged keys: k, v are (pages, Hkv, page_size, d).
    ``num_splits`` > 1 (dense queries, no dropout or P̃): each query block's keys are split among that
    many programs, whose partial (O, L) ``splitkv.merge_splits`` merges (split-KV decoding).

    Launch: ``use_tma`` None loads K_j, V_j through tensor descriptors where the layout allows (the
    autotuner also tries pointers), False never, True always. ``config`` (or FLASHCOURSE_CONFIG_FORWARD)
    pins the configuration; ``block_m``/``block_n`` fix B_r and B_c with the default warps and stages.
    ``decode``: launch with the decoding configurations (few query rows: B_r = 16; FLASHCOURSE_CONFIG_DECODE).

    FP8 (``flashcourse.fp8``; a GPU of compute capability >= 8.9, or the interpreter): q, k, v in
    ``torch.float8_e4m3fn``, v key-major (``fp8.keys_contiguous``), ``descale`` = (q_descale, k_descale,
    v_descale) float32 (B, H, ⌈Nq / 128⌉) and (B, Hkv, ⌈Nk / 128⌉) (``fp8.FP8Inputs``); O in
    ``out_dtype`` (default bfloat16). Dense batches, one split, no P̃.
    """
    check_kernel_device(q=q, k=k, v=v)
    H, d = q.shape[1], q.shape[3]
    Hkv = k.shape[1]
    B, Nq, Nk = sequence_shape(q, k, sequences)
    packed_q = sequences.cu_seqlens_q is not None
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim d = {d} is not supported by the Triton kernels (at most {MAX_HEAD_DIM})")
    if num_splits > 1 and (packed_q or dropout_p > 0 or return_probs):
        raise ValueError("num_splits > 1 takes dense queries, without dropout or returned probabilities")
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8:
        _check_fp8_launch(q, k, v, descale, sequences, num_splits, return_probs, decode)
        descale = [t.contiguous() for t in descale]
    out_dtype = out_dtype or (torch.bfloat16 if fp8 else q.dtype)
    # packed queries: rows of no sequence keep O = 0 and L = −inf
    if out is None:
        o = (torch.zeros if packed_q else torch.empty)(q.shape, dtype=out_dtype, device=q.device)
    else:
        o = out
    lse = (torch.full(q.shape[:3], float("-inf"), device=q.device) if packed_q
           else torch.empty(q.shape[:3], dtype=torch.float32, device=q.device))
    if return_probs:
        padded = [triton.cdiv(n, PROBS_PADDING) * PROBS_PADDING for n in (Nq, Nk)]
        probs = torch.zeros((B, H, *padded), dtype=q.dtype, device=q.device)
    else:
        probs = lse  # never written
    if num_splits > 1:  # partial (O, L) of each split, merged below
        o_out, lse_out = o, lse
        o = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, *q.shape[:3]), dtype=torch.float32, device=q.device)

    kernel = "decode" if decode else "forward"
    # descriptor loads (USE_TMA) need aligned rows; the autotuner tries both where they are allowed
    tma_ok = use_tma is not False and not sequences.paged and tma_compatible(k, v.transpose(2, 3) if fp8 else v)
    if use_tma and not tma_ok:
        raise ValueError("use_tma=True needs k and v with stride 1 along d and 16-byte aligned rows and starts, "
                         "in a cache that is not paged")
    if block_m is not None or block_n is not None:
        default = INTERPRET_CONFIGS[kernel]
        config = KernelConfig(block_m or default.block_m, block_n or default.block_n)
    config = pinned(kernel, config)
    if config is not None:
        if config.use_tma and not tma_ok:
            raise ValueError(f"the configuration {config} loads through descriptors, which these k, v do not allow")
        config = config._replace(use_tma=tma_ok if config.use_tma is None else config.use_tma)
    if tma_ok and not INTERPRET:
        triton.set_allocator(_descriptor_scratch)

    options, flags = score_args(q, Nq, Nk, scale=scale, causal=causal, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state)
    splits = num_splits > 1
    args = (
        q, k, v, o, lse, probs,
        *batch_strides(q, packed_q), *batch_strides(k, sequences.cu_seqlens_k is not None and not sequences.paged),
        *batch_strides(v, sequences.cu_seqlens_k is not None and not sequences.paged),
        *(o.stride()[1:] if splits else batch_strides(o, packed_q)),
        *(lse.stride()[1:3] if splits else batch_strides(lse, packed_q)[:2]),
        o.stride(0) if splits else 0, lse.stride(0) if splits else 0,
        *(probs.stride() if return_probs else (0, 0, 0, 0)),
        H, H // Hkv, Nq, Nk, *sequence_args(sequences, k), *options, *(descale if fp8 else (None,) * 3),
        length_bucket(max(Nq, Nk)), 2 if use_tma else int(tma_ok),
    )
    # an FP8 product reduces over at least 32 elements: d is padded to 32 or more
    meta = dict(HEAD_DIM=d, BLOCK_D=max(32 if fp8 else 16, triton.next_power_of_2(d)),
                RETURN_PROBS=bool(return_probs), FP8=fp8, **dot_args(q.dtype), **flags)
    tuned = _attn_fwd_decode_tuned if decode else _attn_fwd_tuned
    launch(kernel, _attn_fwd_kernel, tuned, lambda bm, bn: (triton.cdiv(Nq, bm), B * H, num_splits), args, meta,
           config)
    if splits:
        merge_splits(o, lse, o_out, lse_out)
        o, lse = o_out, lse_out
    return (o, lse, probs) if return_probs else (o, lse)
