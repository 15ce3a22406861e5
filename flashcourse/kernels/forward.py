"""The FlashAttention forward kernel in Triton (FlashAttention-2, the fused-attention tutorial's layout).

One program computes one block Q_i of B_r query rows of one (batch, head): it streams the key and
value blocks K_j, V_j of B_c rows past Q_i, keeping the running row maximum m_i, the running sum l_i
and the unnormalised output acc_i in registers, and writes O_i = acc_i / l_i and the logsumexp L_i
once at the end. The grid is (⌈Nq / B_r⌉, B · H).

Two tricks of the tutorial:
- base 2: exp(x) = 2^(x · log2 e), so log2 e is folded into the softmax scale once and the loop
  uses ``exp2``; the stored L is converted back to the natural log, which the backward pass expects;
- causal: key blocks entirely above the diagonal are never visited, key blocks entirely below it run
  without any mask, and only the few blocks that cross the diagonal (or the ragged end of the keys)
  are masked. The key loop is therefore split into an unmasked part and a masked part.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import INTERPRET
from .common import check_kernel_device, dot, dot_args, load_tile, quiet_interpreter, store_tile, to_dtype
from .configs import INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, gpu_configs, length_bucket, prune_configs, tma_compatible

LOG2_E = 1.4426950408889634  # log2(e): exp(x) = 2^(x · log2 e)
LN_2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln 2 = 1 / log2(e)
MAX_HEAD_DIM = 256


@triton.jit
def _load_kv_tile(
    src, start_n, cols, stride_row, stride_col, Nk,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """The (B_c, BLOCK_D) tile K_j or V_j starting at key start_n, zero past Nk and past HEAD_DIM.

    ``src`` is a tensor descriptor (USE_TMA: Hopper's copy engine fetches the tile and fills what lies
    outside the (Nk, HEAD_DIM) matrix with zeros) or the head's base pointer (masked only where needed).
    """
    if USE_TMA:
        return src.load([start_n, 0])
    else:
        rows = start_n + tl.arange(0, BLOCK_N)
        if MASK_ROWS or HEAD_DIM != cols.shape[0]:
            return load_tile(src, rows, cols, stride_row, stride_col, Nk, HEAD_DIM)
        else:
            return tl.load(src + rows[:, None] * stride_row + cols[None, :] * stride_col)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, start, end, Nk, shift, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Fold the key blocks K_j, V_j with start <= j·B_c < end into (acc, l_i, m_i).

    m_i and the scores are in base-2 units (scaled by scale · log2 e). MASKED blocks hide keys past
    Nk and, when CAUSAL, keys above the diagonal (key j visible to query i iff j <= i + shift).
    """
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        K_j = _load_kv_tile(K_src, start_n, offs_d, stride_kn, stride_kd, Nk, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
        # S_ij = Q_i K_jᵀ                                        (B_r, B_c), float32
        s = dot(q, tl.trans(K_j), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, DOT_PRECISION)
        if MASKED:
            visible = offs_n[None, :] < Nk
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        # m_new = max(m_i, rowmax(S_ij) · scale · log2 e)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            # a row that has seen no key yet keeps m = −inf; subtract 0 instead (exp2(−inf) = 0, not NaN)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        # P̃_ij = 2^(S_ij · scale · log2 e − m_new)          (= exp(scale·S_ij − m_new / log2 e))
        p = tl.math.exp2(s * qk_scale - m_new_safe[:, None])
        # α = 2^(m_i − m_new): how much the old sums shrink under the new maximum
        alpha = tl.math.exp2(m_i - m_new_safe)
        # l_i = α l_i + rowsum(P̃_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        V_j = _load_kv_tile(V_src, start_n, offs_d, stride_vn, stride_vd, Nk, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
        # acc_i = α acc_i + P̃_ij V_j                           (still unnormalised)
        acc = dot(to_dtype(p, V_j.dtype), V_j, acc * alpha[:, None], UPCAST, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, L,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Nq, Nk, qk_scale, N_BUCKET, TMA_OK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O_i, L_i for one block of B_r = BLOCK_M query rows of one (batch, head). L is contiguous (B, H, Nq).

    N_BUCKET and TMA_OK are read only by the autotuner (its key); USE_TMA loads K_j, V_j through
    tensor descriptors, allowed when TMA_OK.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the last query blocks see the most keys: start them first so that the tail of the grid is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    # grouped-query attention: query head h reads key/value head h // (H / Hkv)
    h_kv = h // GROUP
    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_head = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    O_head = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # the head dim is padded to BLOCK_D, a power of two; columns >= HEAD_DIM are masked to zero
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q_head, offs_m, offs_d, stride_qm, stride_qd, Nq, HEAD_DIM)

    if USE_TMA:
        # K and V of this head as (Nk, d) matrices for the copy engine (row stride 16-byte aligned, d stride 1)
        K_src = tl.make_tensor_descriptor(K_head, [Nk, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        V_src = tl.make_tensor_descriptor(V_head, [Nk, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    else:
        K_src = K_head
        V_src = V_head

    # m_i = −inf, l_i = 0, acc_i = 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys in whole blocks of B_c need no mask at the ragged end
    full_end = (Nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # bottom-right alignment: query i sees key j iff j <= i + shift, shift = Nk − Nq
        shift = Nk - Nq
        # past the last key that the last row of the block sees: later blocks are skipped entirely
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Nk)
        # key blocks ending at or before the first row's diagonal are visible to every row: no mask
        unmasked_end = tl.minimum((tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N, full_end)
    else:
        shift = 0
        end = Nk
        unmasked_end = full_end

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, unmasked_end, Nk, shift, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, unmasked_end, end, Nk, shift, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
    )

    # O_i = acc_i / l_i, one division at the end; a row that saw no key (l_i = 0) gets O_i = 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    store_tile(O_head, to_dtype(o, O.dtype.element_ty), offs_m, offs_d, stride_om, stride_od, Nq, HEAD_DIM)
    # L_i = ln 2 · (m_i + log2 l_i), natural log again; −inf for a row that saw no key (m_i = −inf)
    lse = (m_i + tl.math.log2(l_safe)) * LN_2
    tl.store(L + pid_bh.to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


_attn_fwd_tuned = triton.autotune(
    configs=gpu_configs(),
    key=["HEAD_DIM", "CAUSAL", "TMA_OK", "N_BUCKET", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_attn_fwd_kernel)


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
):
    """Launch the forward kernel. q (B, H, Nq, d), k, v (B, Hkv, Nk, d), any strides -> (O, L).

    O is (B, H, Nq, d) in q's dtype, contiguous (written into ``out`` when given); L is the natural-log
    logsumexp of each scaled score row, float32 (B, H, Nq), contiguous. The inputs are assumed valid
    (``flashcourse.flash_attention`` checks them). ``block_m``/``block_n`` fix B_r and B_c (with the
    default warps and stages on a GPU) instead of the interpreter blocks or the GPU autotuner.
    """
    check_kernel_device(q=q, k=k, v=v)
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim d = {d} is not supported by the Triton kernels (at most {MAX_HEAD_DIM})")
    o = torch.empty((B, H, Nq, d), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    # descriptor loads (USE_TMA) are possible only for aligned layouts; the autotuner also tries pointers
    tma_ok = tma_compatible(k, v)
    if tma_ok and not INTERPRET:
        triton.set_allocator(_descriptor_scratch)
    args = (
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // Hkv, Nq, Nk, scale * LOG2_E, length_bucket(max(Nq, Nk)), tma_ok,
    )
    meta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=bool(causal), **dot_args(q.dtype))
    if INTERPRET or block_m is not None or block_n is not None:
        block_m = block_m or INTERPRET_BLOCK_M
        block_n = block_n or INTERPRET_BLOCK_N
        grid = (triton.cdiv(Nq, block_m), B * H)
        with quiet_interpreter():
            _attn_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=tma_ok)
    else:
        grid = lambda META: (triton.cdiv(Nq, META["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return o, lse
