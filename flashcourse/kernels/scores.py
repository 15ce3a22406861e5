"""One tile of scores, from Q_i K_jᵀ to P_ij: what the forward, dK/dV and dQ kernels share.

For query row i and key row j of one (batch, head), with offset = Nk − Nq (the queries are the last
Nq positions, so the causal diagonal is bottom-right aligned), flash-attn's options act in this order:

    s_ij = scale · q_i · k_j                                scaled dot product
    s_ij = cap · tanh(s_ij / cap)                           soft-capping (softcap = cap > 0)
    s_ij = s_ij − slope_h · |i + offset − j|                ALiBi (a slope per head, or per batch and head)
    s_ij = −inf unless i + offset − left <= j <= i + offset + right, and j < Nk      the window
    P_ij = exp(s_ij − L_i),  L_i = log Σ_j exp(s_ij)        softmax
    P_ij = P_ij · Z_ij / (1 − p),  Z_ij ~ Bernoulli(1 − p)  dropout (p = dropout_p)

Causal attention is the window (left = ∞, right = 0); no window is (∞, ∞). ``scores`` computes the
first four lines for a tile, ``dropout_keep`` draws Z, ``key_range`` / ``query_range`` say which
blocks a tile must visit and which of them need no mask (every pair visible). Every option is a
compile-time flag: when it is off, its code is not in the kernel.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2_E = math.log2(math.e)  # exp(x) = 2^(x · log2 e): the kernels work in base 2
LOG2E: tl.constexpr = tl.constexpr(LOG2_E)


# ----------------------------------------------------------------------------------------------
# Host side: the options as kernel arguments


def window_bounds(causal: bool, window_size, Nq: int, Nk: int) -> tuple[int, int]:
    """(left, right) of the window, -1 for no limit, with ``causal`` folded in (right = 0).

    A limit that hides nothing is dropped (left >= Nk, or right >= Nq − 1 where even the first
    query sees the last key), so such a call runs the code of plain attention.
    """
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    if left >= Nk:
        left = -1
    if right >= Nq - 1:
        right = -1
    return max(left, -1), max(right, -1)


def new_rng_state(device) -> torch.Tensor:
    """(seed, offset) of Philox for one dropout call, int64 on ``device``, drawn from torch's default
    generator of that device: ``torch.manual_seed`` makes the dropout repeatable. The forward and
    the backward of one call must get the same state (the backward regenerates the mask from it)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def score_args(q, Nq, Nk, *, scale, causal, window_size=(-1, -1), softcap=0.0,
               alibi_slopes: Optional[torch.Tensor] = None, dropout_p=0.0, rng_state=None):
    """The score options of a call as kernel arguments: (runtime arguments, compile-time flags).

    The runtime arguments come in the order every kernel declares them: SLOPES, stride_slope_b,
    stride_slope_h, RNG, scale, left, right, softcap_scale, softcap_log2, dropout_p. Tensors that an
    option does not use are replaced by ``q`` (never read).
    """
    left, right = window_bounds(causal, window_size, Nq, Nk)
    if dropout_p > 0 and rng_state is None:
        raise ValueError(
            "dropout_p > 0 needs rng_state, the (seed, offset) of its random numbers: draw one with "
            "flashcourse.kernels.scores.new_rng_state(q.device) and pass the same one to attention_backward"
        )
    if alibi_slopes is None:
        slopes, slope_strides = q, (0, 0)
    elif alibi_slopes.dim() == 1:  # (H,): the same slopes for every batch
        slopes, slope_strides = alibi_slopes, (0, alibi_slopes.stride(0))
    else:  # (B, H)
        slopes, slope_strides = alibi_slopes, tuple(alibi_slopes.stride())
    # soft-capping: cap · tanh(scale · s / cap), log2 e folded into the outer factor
    softcap_scale, softcap_log2 = (scale / softcap, softcap * LOG2_E) if softcap > 0 else (0.0, 0.0)
    args = (slopes, *slope_strides, q if rng_state is None else rng_state, float(scale), left, right,
            softcap_scale, softcap_log2, float(dropout_p))
    flags = dict(LEFT_LIMIT=left >= 0, RIGHT_LIMIT=right >= 0, SOFTCAP=softcap > 0,
                 ALIBI=alibi_slopes is not None, DROPOUT=dropout_p > 0)
    return args, flags


# ----------------------------------------------------------------------------------------------
# Device side


@triton.jit
def score_constants(SLOPES, stride_slope_b, stride_slope_h, RNG, b, h, scale, ALIBI: tl.constexpr,
                    DROPOUT: tl.constexpr):
    """The per-head constants of ``scores`` and ``dropout_keep`` for batch b, query head h:
    (scale · log2 e, slope_h · log2 e, seed, philox_offset); 0 for an option that is off."""
    slope_log2 = 0.0
    if ALIBI:
        slope_log2 = tl.load(SLOPES + b * stride_slope_b + h * stride_slope_h) * LOG2E
    seed = 0
    philox_offset = 0
    if DROPOUT:
        seed = tl.load(RNG)
        philox_offset = tl.load(RNG + 1)
    return scale * LOG2E, slope_log2, seed, philox_offset


@triton.jit
def _tanh(x):
    """tanh x = 1 − 2 / (e^(2x) + 1): ±1 at ±inf, NaN stays NaN (portable: no libdevice call)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def scores(S, i, j, Nk, offset, qk_scale, left, right, softcap_scale, softcap_log2, slope_log2,
           MASK: tl.constexpr, LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr,
           SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """The base-2 scores of the tile S = Q_i K_jᵀ (raw dot products) of query rows i, key rows j.

    i and j are index tiles that broadcast to S's shape (i[:, None], j[None, :], or transposed for a
    transposed tile). Returns (X, c, T): the scores are log2 e · s_ij = c · X, and −inf where key j
    is hidden from query i if MASK (blocks known to be visible skip it). Plain attention keeps
    X = S and c = scale · log2 e, so that the softmax multiplies once, fused with its subtraction
    (exp2(c · X − m)); with soft-capping or ALiBi, X is the finished score and c = 1.
    T = tanh(scale · s_ij / cap) under soft-capping (its backward needs 1 − T²), else S.
    """
    if SOFTCAP:
        # s = cap · tanh(scale · q·k / cap)
        T = _tanh(S * softcap_scale)
        X = T * softcap_log2
    elif ALIBI:
        T = S
        X = S * qk_scale
    else:
        T = S
        X = S
    if ALIBI:
        # s −= slope · |i + Nk − Nq − j|
        X = X - slope_log2 * tl.abs(i + offset - j).to(tl.float32)
    if SOFTCAP or ALIBI:
        c = 1.0
    else:
        c = qk_scale
    if MASK:
        # the window: i + offset − left <= j <= i + offset + right, and j < Nk (the ragged end)
        visible = j < Nk
        if RIGHT_LIMIT:
            visible = visible & (j <= i + (offset + right))
        if LEFT_LIMIT:
            visible = visible & (j >= i + (offset - left))
        X = tl.where(visible, X, float("-inf"))
    return X, c, T


@triton.jit
def dropout_keep(seed, philox_offset, bh, i, j, Nq, Nk, dropout_p):
    """Z_ij = (u_ij >= p) for query rows i and key rows j of head bh = b · H + h (broadcastable tiles).

    u_ij is uniform in [0, 1), drawn by Philox at counter philox_offset + (bh · Nq + i) · Nk + j: one
    number per (batch, head, i, j), the same in the forward and in both backward kernels. Nq and Nk
    are the longest sequence's (``sequences.py``): each sequence of a packed batch has its own counters.
    """
    counter = philox_offset + (bh.to(tl.int64) * Nq + i) * Nk + j
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def key_range(start_m, Nk, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr):
    """Which key blocks the query rows start_m .. start_m + B_r − 1 visit: (lo, mid_lo, mid_hi, hi).

    Blocks in [lo, hi) hold every key some row sees (blocks outside are never loaded); those in
    [mid_lo, mid_hi) are whole blocks seen by every row and need no mask; [lo, mid_lo) cross the
    left edge of the window, [mid_hi, hi) the right edge (the causal diagonal) or the ragged end Nk.
    """
    lo = 0
    mid_lo = 0
    # whole blocks of B_c keys end here: past it the ragged end needs the mask
    mid_hi = Nk // BLOCK_N * BLOCK_N
    hi = Nk
    if RIGHT_LIMIT:
        # the last row sees keys j <= start_m + B_r − 1 + offset + right: later blocks are skipped
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset + right, 0), Nk)
        # the first row sees keys j <= start_m + offset + right: blocks ending there are seen by all
        mid_hi = tl.minimum(tl.maximum(start_m + offset + right + 1, 0) // BLOCK_N * BLOCK_N, mid_hi)
    if LEFT_LIMIT:
        # the first row sees keys j >= start_m + offset − left: earlier blocks are skipped
        lo = tl.maximum(start_m + offset - left, 0) // BLOCK_N * BLOCK_N
        # the last row sees keys j >= start_m + B_r − 1 + offset − left: blocks from there on by all
        mid_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + offset - left, 0), BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def query_range(start_n, Nq, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr):
    """Which query blocks see the keys start_n .. start_n + B_c − 1: (lo, mid_lo, mid_hi, hi).

    The transpose of ``key_range``: blocks of B_r rows in [lo, hi) see some key of the block (the
    others are never loaded), those in [mid_lo, mid_hi) see all of them and need no mask; rows past
    Nq are harmless there (their P_ij = 0). [lo, mid_lo) cross the right edge of the window (the
    causal diagonal), [mid_hi, hi) the left edge.
    """
    lo = 0
    mid_lo = 0
    mid_hi = Nq
    hi = Nq
    if RIGHT_LIMIT:
        # row i sees key start_n iff i >= start_n − offset − right: earlier rows see none of the block
        lo = tl.maximum(start_n - offset - right, 0) // BLOCK_M * BLOCK_M
        # rows i >= start_n + B_c − 1 − offset − right see the last key of the block, hence all
        mid_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset - right, 0), BLOCK_M) * BLOCK_M
    if LEFT_LIMIT:
        # row i sees key start_n + B_c − 1 iff i <= start_n + B_c − 1 − offset + left: later rows see none
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - offset + left, 0), Nq)
        # rows i <= start_n − offset + left see the first key of the block, hence all
        mid_hi = tl.maximum(start_n - offset + left + 1, 0) // BLOCK_M * BLOCK_M
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi
