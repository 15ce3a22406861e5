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
atomics, so a second run gives bitwise the same result.

Exponentials are taken in base 2 with log2(e) folded into one constant:
exp(scale · s − L) = exp2(log2e · scale · s − log2e · L), a fused multiply-add and an exp2 per score.
The factor ``scale`` of dS = ∂loss/∂(scale · QKᵀ) is applied once to the finished dQ_i and dK_j.
"""

import math

import torch
import triton
import triton.language as tl

from .._checks import check_attention_inputs, check_like
from .._env import INTERPRET
from .common import check_kernel_device, dot, dot_args, load_tile, quiet_interpreter, store_tile, to_dtype
from .configs import length_bucket

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(LOG2E · x)

# Launch configurations. The interpreter runs one small fixed configuration (fast tests, ragged
# edges reached at small N); on a GPU, triton.autotune picks per (d, causal, dtype, N bucket).
# Every kernel writes its outputs (never accumulates into them), so autotune may re-run it freely.
def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


if INTERPRET:
    _DKDV_CONFIGS = _configs([(16, 32, 4, 1)])
    _DQ_CONFIGS = _configs([(32, 16, 4, 1)])
    _PRE_BLOCK_M = 32
else:  # Hopper, from the H100 run in benchmarks/NOTES_backward.md; (B_r, B_c, warps, stages)
    # dK/dV: a wide key block B_c = 128 wins (32 rows, 4 warps at d <= 64; 64 rows, 8 warps at d = 128);
    # (32, 64, 4) wins short causal runs; the last ones are there for d = 256 (and float32 d >= 128).
    _DKDV_CONFIGS = _configs([(32, 128, 4, 4), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 64, 8, 2),
                              (16, 32, 4, 2)])
    # dQ: (128, 64, 8 warps, 3 stages) won every measured shape
    _DQ_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)])
    _PRE_BLOCK_M = 64


def _fitting(kernel):
    """An autotune pruner keeping the first three configurations that fit on chip for this head dim:
    float32 accumulators ((B_c, d) twice for dK/dV, (B_r, d) for dQ) in at most 128 of a thread's 255
    registers, and an estimated 200 KB of shared memory for the two tiles streamed per pipeline stage
    (Q_iᵀ, dO_i or K_jᵀ, V_jᵀ) plus the two kept resident (K_j, V_j or Q_i, dO_i)."""

    def prune(configs, named_args, **kwargs):
        d, size = kwargs["D_PAD"], named_args["Q"].element_size()

        def cost(c):
            kept, streamed = (("BLOCK_N", "BLOCK_M") if kernel == "dkdv" else ("BLOCK_M", "BLOCK_N"))
            registers = c.kwargs[kept] * (2 if kernel == "dkdv" else 1) * d / (32 * c.num_warps)
            shared = 2 * d * size * (c.num_stages * c.kwargs[streamed] + c.kwargs[kept])
            return shared / 200e3, registers / 128

        return [c for c in configs if max(cost(c)) <= 1][:3] or [min(configs, key=lambda c: max(cost(c)))]

    return prune


@triton.jit
def _preprocess(O, dO, Delta, stride_ob, stride_oh, stride_om, stride_od,
                stride_dob, stride_doh, stride_dom, stride_dod, H, Nq,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[b, h, i] = D_i = Σ_k dO_ik O_ik for one block of B_r query rows."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    O_i = load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Nq, HEAD_DIM)
    dO_i = load_tile(dO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Nq, HEAD_DIM)
    # D_i = rowsum(dO_i ∘ O_i)
    D_i = tl.sum(dO_i.to(tl.float32) * O_i.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * Nq + offs_m, D_i, mask=offs_m < Nq)


@triton.jit
def _row_stats(L_bh, Delta_bh, offs_m, Nq):
    """(log2e · L_i, D_i) of the rows offs_m; rows past Nq get L_i = +inf, so that their P_ij = 0.

    A row that sees no key (causal, Nq > Nk) has L_i = −inf: exp2(… − L_i) = inf there, but such a
    row only ever meets keys of blocks that cross the diagonal, where the mask turns P_ij into 0.
    """
    L_i = tl.load(L_bh + offs_m, mask=offs_m < Nq, other=float("inf"))
    D_i = tl.load(Delta_bh + offs_m, mask=offs_m < Nq, other=0.0)
    return L_i * LOG2E, D_i


@triton.jit
def _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                stride_qm, stride_qd, stride_dom, stride_dod,
                start_n, lo, hi, Nq, offset, qk_scale,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add to dK_j, dV_j (B_c, d) the terms of query blocks lo, lo + B_r, ... < hi of one head.

    MASK: apply the causal mask (blocks that cross the diagonal). Key rows past Nk need no mask:
    they only reach their own rows of dK_j and dV_j, which are never stored.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        QT_i = load_tile(Q_h, offs_d, offs_m, stride_qd, stride_qm, HEAD_DIM, Nq)  # Q_iᵀ (d, B_r)
        dO_i = load_tile(dO_h, offs_m, offs_d, stride_dom, stride_dod, Nq, HEAD_DIM)  # (B_r, d)
        L_i, D_i = _row_stats(L_h, Delta_h, offs_m, Nq)
        # S_ijᵀ = K_j Q_iᵀ (before scaling)                         (B_c, B_r)
        ST_ij = dot(K_j, QT_i, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, DOT_PRECISION)
        # P_ijᵀ = exp(scale · S_ijᵀ − L_i) = exp2(log2e · scale · S_ijᵀ − log2e · L_i)
        PT_ij = tl.math.exp2(ST_ij * qk_scale - L_i[None, :])
        if MASK:
            # causal, bottom-right aligned: query i sees key j iff j <= i + Nk − Nq
            PT_ij = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, PT_ij, 0.0)
        # dV_j += P_ijᵀ dO_i
        dV_j = dot(to_dtype(PT_ij, dO_i.dtype), dO_i, dV_j, UPCAST, DOT_PRECISION)
        # dP_ijᵀ = V_j dO_iᵀ                                         (B_c, B_r)
        dPT_ij = dot(V_j, tl.trans(dO_i), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, DOT_PRECISION)
        # dS_ijᵀ = P_ijᵀ ∘ (dP_ijᵀ − D_i)
        dST_ij = PT_ij * (dPT_ij - D_i[None, :])
        # dK_j += dS_ijᵀ Q_i                      (the factor scale comes once, at the end)
        dK_j = dot(to_dtype(dST_ij, QT_i.dtype), tl.trans(QT_i), dK_j, UPCAST, DOT_PRECISION)
    return dK_j, dV_j


@triton.autotune(configs=_DKDV_CONFIGS, key=["HEAD_DIM", "CAUSAL", "N_BUCKET", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _fitting("dkdv")})
@triton.jit
def _dkdv(Q, K, V, dO, dK, dV, L, Delta,
          stride_qb, stride_qh, stride_qm, stride_qd,
          stride_kb, stride_kh, stride_kn, stride_kd,
          stride_vb, stride_vh, stride_vn, stride_vd,
          stride_dob, stride_doh, stride_dom, stride_dod,
          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
          H, Hkv, Nq, Nk, scale, N_BUCKET,
          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK_j, dV_j (B_c, d) of one key block j of one key/value head, summed over its query heads.

    Grid: (cdiv(Nk, B_c), B · Hkv). dK and dV are contiguous (B, Hkv, Nk, d) with the same strides.
    """
    start_n = tl.program_id(0) * BLOCK_N
    b, hkv = (tl.program_id(1) // Hkv).to(tl.int64), (tl.program_id(1) % Hkv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    K_j = load_tile(K + b * stride_kb + hkv * stride_kh, offs_n, offs_d, stride_kn, stride_kd, Nk, HEAD_DIM)
    V_j = load_tile(V + b * stride_vb + hkv * stride_vh, offs_n, offs_d, stride_vn, stride_vd, Nk, HEAD_DIM)
    dK_j = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dV_j = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    qk_scale = scale * LOG2E
    offset = Nk - Nq
    # query blocks [lo, mid) cross the diagonal and need the mask, [mid, Nq) see the whole key block
    lo = 0
    mid = 0
    if CAUSAL:
        # rows i < start_n − offset see no key of this block: their blocks are skipped
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        # from row start_n + B_c − 1 − offset on, a row sees every key of the block
        mid = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, lo)
    group = H // Hkv
    for g in range(group):  # query head h = hkv · H/Hkv + g reads this key/value head
        h = hkv * group + g
        Q_h = Q + b * stride_qb + h * stride_qh
        dO_h = dO + b * stride_dob + h * stride_doh
        L_h = L + (b * H + h) * Nq
        Delta_h = Delta + (b * H + h) * Nq
        if CAUSAL:
            dK_j, dV_j = _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     start_n, lo, tl.minimum(mid, Nq), Nq, offset, qk_scale,
                                     HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, True, UPCAST, DOT_PRECISION)
        dK_j, dV_j = _dkdv_tiles(dK_j, dV_j, K_j, V_j, Q_h, dO_h, L_h, Delta_h,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 start_n, mid, Nq, Nq, offset, qk_scale,
                                 HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, False, UPCAST, DOT_PRECISION)
    # dK_j = scale · Σ_i dS_ijᵀ Q_i
    dK_j *= scale
    out = b * stride_dkb + hkv * stride_dkh
    store_tile(dK + out, to_dtype(dK_j, dK.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd, Nk, HEAD_DIM)
    store_tile(dV + out, to_dtype(dV_j, dV.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd, Nk, HEAD_DIM)


@triton.jit
def _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
              start_m, lo, hi, Nk, offset, qk_scale,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Add to dQ_i (B_r, d) the terms of key blocks lo, lo + B_c, ... < hi.

    MASK: mask keys past Nk (the ragged last block) and, when CAUSAL, keys right of the diagonal.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        KT_j = load_tile(K_h, offs_d, offs_n, stride_kd, stride_kn, HEAD_DIM, Nk)  # K_jᵀ (d, B_c)
        VT_j = load_tile(V_h, offs_d, offs_n, stride_vd, stride_vn, HEAD_DIM, Nk)  # V_jᵀ (d, B_c)
        # S_ij = Q_i K_jᵀ (before scaling)                          (B_r, B_c)
        S_ij = dot(Q_i, KT_j, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, DOT_PRECISION)
        # P_ij = exp(scale · S_ij − L_i) = exp2(log2e · scale · S_ij − log2e · L_i)
        P_ij = tl.math.exp2(S_ij * qk_scale - L_i[:, None])
        if MASK:
            visible = offs_n[None, :] < Nk
            if CAUSAL:
                # bottom-right aligned: query i sees key j iff j <= i + Nk − Nq
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
            P_ij = tl.where(visible, P_ij, 0.0)
        # dP_ij = dO_i V_jᵀ
        dP_ij = dot(dO_i, VT_j, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, DOT_PRECISION)
        # dS_ij = P_ij ∘ (dP_ij − D_i)
        dS_ij = P_ij * (dP_ij - D_i[:, None])
        # dQ_i += dS_ij K_j                       (the factor scale comes once, at the end)
        dQ_i = dot(to_dtype(dS_ij, KT_j.dtype), tl.trans(KT_j), dQ_i, UPCAST, DOT_PRECISION)
    return dQ_i


@triton.autotune(configs=_DQ_CONFIGS, key=["HEAD_DIM", "CAUSAL", "N_BUCKET", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _fitting("dq")})
@triton.jit
def _dq(Q, K, V, dO, dQ, L, Delta,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        H, Hkv, Nq, Nk, scale, N_BUCKET,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ_i (B_r, d) of one query block i of one head. Grid: (cdiv(Nq, B_r), B · H)."""
    # causal: the last query blocks see the most keys, so they are started first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b, h = (tl.program_id(1) // H).to(tl.int64), (tl.program_id(1) % H).to(tl.int64)
    hkv = h // (H // Hkv)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    Q_i = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, HEAD_DIM)
    dO_i = load_tile(dO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Nq, HEAD_DIM)
    L_i, D_i = _row_stats(L + (b * H + h) * Nq, Delta + (b * H + h) * Nq, offs_m, Nq)
    K_h = K + b * stride_kb + hkv * stride_kh
    V_h = V + b * stride_vb + hkv * stride_vh
    qk_scale = scale * LOG2E
    offset = Nk - Nq
    # key blocks [0, mid) are seen whole by every row of the block, [mid, hi) need the mask
    if CAUSAL:
        # keys j < start_m + B_r + offset are seen by some row of the block
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), Nk)
        # keys j <= start_m + offset are seen by every row
        mid = tl.minimum(tl.maximum(start_m + offset + 1, 0), hi) // BLOCK_N * BLOCK_N
    else:
        hi = Nk
        mid = Nk // BLOCK_N * BLOCK_N
    dQ_i = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dQ_i = _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
                     start_m, 0, mid, Nk, offset, qk_scale,
                     HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, False, CAUSAL, UPCAST, DOT_PRECISION)
    dQ_i = _dq_tiles(dQ_i, Q_i, dO_i, L_i, D_i, K_h, V_h, stride_kn, stride_kd, stride_vn, stride_vd,
                     start_m, mid, hi, Nk, offset, qk_scale,
                     HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, True, CAUSAL, UPCAST, DOT_PRECISION)
    # dQ_i = scale · Σ_j dS_ij K_j
    dQ_i *= scale
    store_tile(dQ + b * stride_dqb + h * stride_dqh, to_dtype(dQ_i, dQ.dtype.element_ty),
               offs_m, offs_d, stride_dqm, stride_dqd, Nq, HEAD_DIM)


def attention_backward(q, k, v, o, lse, do, *, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of O = softmax(scale · Q Kᵀ) V, from the forward's O and logsumexp L.

    q, o, do: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with H % Hkv == 0; lse: (B, H, Nq), the
    natural-log logsumexp of the scaled scores (−inf for a row that sees no key). Causal masking is
    bottom-right aligned. Any strides. Returns dq like q and dk, dv like k, v (contiguous, input
    dtype; dk, dv summed over the H / Hkv query heads of each key/value head).
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    check_like("o", o, q, "q")
    check_like("do", do, q, "q")
    if tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"lse must have shape (B, H, Nq) = {(B, H, Nq)}, got {tuple(lse.shape)}")
    check_kernel_device(q=q, k=k, v=v, o=o, lse=lse, do=do)
    lse = lse.to(torch.float32).contiguous()
    D_PAD = max(16, triton.next_power_of_2(d))
    shape_args = dict(HEAD_DIM=d, D_PAD=D_PAD)
    run_args = dict(N_BUCKET=length_bucket(max(Nq, Nk)), CAUSAL=bool(causal), **dot_args(q.dtype), **shape_args)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)

    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    sizes = (H, Hkv, Nq, Nk, float(scale))
    with quiet_interpreter():
        _preprocess[(triton.cdiv(Nq, _PRE_BLOCK_M), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, Nq, BLOCK_M=_PRE_BLOCK_M, **shape_args)
        _dkdv[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, do, dk, dv, lse, delta, *strides, *dk.stride(), *sizes, **run_args)
        _dq[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, *strides, *dq.stride(), *sizes, **run_args)
    return dq, dk, dv
