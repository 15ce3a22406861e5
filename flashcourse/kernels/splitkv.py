"""Split-KV (flash-decoding): the keys of one query block shared among several programs, and the merge.

Decoding has one query row per sequence (Nq = 1), so the forward kernel's grid (⌈Nq / B_r⌉, B · H)
has only B · H programs, too few to fill a GPU of 132 SMs when the batch is small, while each of
them streams a long KV cache alone. Split-KV adds a third grid axis: program (i, bh, s) folds only
the s-th of ``num_splits`` equal shares of the key blocks its rows visit (``split_range``), and
writes a partial, normalised output O_s with its logsumexp L_s. The partials are then merged with
chapter 02's rule (``flashcourse.softmax.merge_states``), each split being the state
(m, l, o) = (L_s, 1, O_s):

    L = log Σ_s exp(L_s),      O = Σ_s exp(L_s − L) · O_s

``merge_splits`` runs that merge in one small kernel. ``num_splits_heuristic`` chooses the number of
splits as flash-attn does: just enough programs to fill the SMs in whole waves.
"""

import math

import torch
import triton
import triton.language as tl

from ..gpumodel import H100_SXM
from .common import load_tile, store_tile, to_dtype
from .configs import MERGE_BLOCK_M, KernelConfig, launch


@triton.jit
def split_range(lo, mid_lo, mid_hi, hi, split, num_splits, BLOCK_N: tl.constexpr):
    """``key_range``'s (lo, mid_lo, mid_hi, hi) cut to the share of split ``split`` of ``num_splits``:
    ⌈blocks / splits⌉ whole key blocks each, in order (the last shares may be short or empty)."""
    # B_c · ⌈⌈(hi − lo) / B_c⌉ / splits⌉ keys per split, from lo
    chunk = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits) * BLOCK_N
    split_lo = tl.minimum(lo + split * chunk, hi)
    split_hi = tl.minimum(split_lo + chunk, hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, split_lo), split_hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), split_hi)
    return split_lo, mid_lo, mid_hi, split_hi


@triton.jit
def _merge_kernel(O_parts, L_parts, O, L, num_splits,
                  stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
                  stride_ls, stride_lb, stride_lh,
                  stride_ob, stride_oh, stride_om, stride_od,
                  H, Nq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """O_i, L_i of B_r query rows of one (batch, head) from the partial (O_s, L_s) of every split.

    O_parts (splits, B, H, Nq, d) and L_parts (splits, B, H, Nq) are float32; L (B, H, Nq) has
    L_parts' strides without the first; O any strides.
    """
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # the empty state: m = −inf, l = 0, o = 0
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        # split s is the state (m_s, l_s, o_s) = (L_s, 1, O_s)
        L_s = tl.load(L_parts + s * stride_ls + b * stride_lb + h * stride_lh + offs_m, mask=offs_m < Nq,
                      other=float("-inf"))
        O_s = load_tile(O_parts + s * stride_ps + b * stride_pb + h * stride_ph, offs_m, offs_d, stride_pm, stride_pd,
                        Nq, HEAD_DIM)
        # merge_states: m_new = max(m, m_s), α = exp(m − m_new), β = exp(m_s − m_new) (0 for an empty split)
        m_new = tl.maximum(m, L_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(L_s - m_safe)
        # l = α l + β l_s,  o = α o + β o_s
        l = alpha * l + beta
        o = alpha[:, None] * o + beta[:, None] * O_s
        m = m_new
    # O = o / l and L = m + log l: 0 and −inf for a row that no split saw a key of
    l_safe = tl.where(l == 0.0, 1.0, l)
    store_tile(O + b * stride_ob + h * stride_oh, to_dtype(o / l_safe[:, None], O.dtype.element_ty),
               offs_m, offs_d, stride_om, stride_od, Nq, HEAD_DIM)
    L_row = tl.where(l == 0.0, float("-inf"), m + tl.log(l_safe))
    tl.store(L + b * stride_lb + h * stride_lh + offs_m, L_row, mask=offs_m < Nq)


def merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """out (B, H, Nq, d), any strides, and lse (B, H, Nq), contiguous, from the partial outputs
    o_parts (splits, B, H, Nq, d) and logsumexps lse_parts (splits, B, H, Nq) of the splits."""
    S, B, H, Nq, d = o_parts.shape
    args = (o_parts, lse_parts, out, lse, S, *o_parts.stride(), *lse_parts.stride()[:3], *out.stride(), H, Nq)
    launch("merge", _merge_kernel, None, lambda bm, bn: (triton.cdiv(Nq, bm), B * H), args,
           dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d))), KernelConfig(MERGE_BLOCK_M, 1))


def num_splits_heuristic(programs: int, sms: int, key_blocks: int, max_splits: int = 128) -> int:
    """flash-attn's choice of the number of splits: the fewest that reach 85% of the best wave efficiency.

    ``programs`` run without splitting on ``sms`` slots; with s splits there are s · programs, in
    ⌈s · programs / sms⌉ waves, of which the last may be partly idle: efficiency = waves / ⌈waves⌉.
    Enough programs to fill 80% of the slots need no split. A count that leaves the blocks per split
    the same as one split fewer is skipped (e.g. 64 blocks in 11 or 12 splits: 6 blocks each).
    """
    if programs >= 0.8 * sms:
        return 1
    max_splits = min(max_splits, sms, key_blocks)

    def eligible(s):
        return s == 1 or math.ceil(key_blocks / s) != math.ceil(key_blocks / (s - 1))

    def efficiency(s):
        waves = programs * s / sms
        return waves / math.ceil(waves)

    candidates = [s for s in range(1, max_splits + 1) if eligible(s)]
    best = max((efficiency(s) for s in candidates), default=1.0)
    return next((s for s in candidates if efficiency(s) >= 0.85 * best), 1)


def choose_num_splits(programs: int, Nk: int, d: int, device) -> int:
    """The number of splits for ``programs`` (batch × heads × query blocks) over Nk keys of head dim d.

    As flash-attn counts them: key blocks of 256 (d <= 64), 128 (d <= 128) or 64 keys, two programs
    per SM (``multi_processor_count`` of the device; the interpreter plans for an H100's 132).
    """
    device = torch.device(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SXM.sms
    block_n = 256 if d <= 64 else 128 if d <= 128 else 64
    return num_splits_heuristic(programs, 2 * sms, triton.cdiv(max(Nk, 1), block_n))
