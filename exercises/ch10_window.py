# Your exercises: replace each stub, then run `flashcourse grade ch10`. Generated from solutions/.
"""Chapter 10: a sliding window in the forward kernel of chapter 05. The launcher is given; you write the kernel.

flash-attn's ``window_size = (left, right)`` lets query i see only the keys near its diagonal
(bottom-right aligned, as causal is: query i sits at position i + Nk − Nq of the keys):

    query i sees key j  iff  i + Nk − Nq − left <= j <= i + Nk − Nq + right        (−1: no limit on that side)

Causal attention is the window (−1, 0), and causal with a window is (left, 0): the launcher folds
``causal`` into ``right``. A window makes attention cheaper only if the kernel also *skips* the key
blocks that no row of its query block can see: the loop over key blocks starts and ends at the
window's edges instead of at 0 and Nk. Run `flashcourse grade ch10` to check your work.
"""

import math

import flashcourse  # noqa: F401  (imported before triton: switches the interpreter on without a GPU)
import torch
import triton
import triton.language as tl

from flashcourse.grading import require_implemented, require_kernel_dtype
from flashcourse.kernels.common import load_tile, store_tile  # given: masked 2-d tile load and store

LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
LN_2 = tl.constexpr(0.6931471805599453)  # ln(x) = log2(x) · ln 2


@triton.jit
def load_kv(K, V, start_n, offs_d, Nk, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, visits):
    """Given: the key block K_j and value block V_j of rows start_n … start_n + B_c − 1 of one head (zeros
    past Nk), and one more visit counted in *visits (the grader counts the blocks each program loads)."""
    tl.atomic_add(visits, 1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM)
    v = load_tile(V, offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM)
    return k, v


@triton.jit
def window_fwd_kernel(Q, K, V, O, L, Visits, Nq, Nk, scale, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O_i (B_r, d) and L_i (B_r,) of the query block i = tl.program_id(0) of the head bh = tl.program_id(1),
    attending only to the keys inside the window (WINDOW_LEFT, WINDOW_RIGHT; −1: no limit on that side).

    The layout and the online softmax are those of chapter 05 (q, O (B·H, Nq, d); k, v (B·H, Nk, d);
    L (B·H, Nq); base 2). What changes:

        visible_ij = (j >= i + Nk − Nq − left) and (j <= i + Nk − Nq + right) and (j < Nk)

    and the loop over key blocks runs from the first block that row start_m can see to the last block
    that row start_m + B_r − 1 can see: every other block is hidden from the whole query block and is
    never loaded. Load each key/value block with ``load_kv(K_bh, V_bh, start_n, offs_d, Nk, HEAD_DIM,
    BLOCK_N, Visits + bh * tl.num_programs(0) + tl.program_id(0))``, which counts the visit. A row that
    sees no key gets O = 0 and L = −inf.

    Hints:
      1. offset = Nk − Nq is where query 0 sits among the keys.
      2. With a left limit, the first block starts at max(start_m + offset − left, 0), rounded down to a
         multiple of BLOCK_N; with a right limit, the loop ends at min(start_m + B_r + offset + right, Nk)
         (and at least 0: a block whose rows see no key visits nothing).
      3. WINDOW_LEFT and WINDOW_RIGHT are tl.constexpr: `if WINDOW_LEFT >= 0:` is decided when the
         kernel is compiled.
      4. Mask with the window even inside the loop bounds: a block can be partly visible.
    """
    raise NotImplementedError("ch10.window_fwd_kernel: not implemented yet")


def windowed_attention_forward(q, k, v, causal: bool = False, window_size=(-1, -1), scale=None,
                               BLOCK_M: int = 16, BLOCK_N: int = 16):
    """Given launcher: q (B, H, Nq, d), k, v (B, H, Nk, d) -> O (B, H, Nq, d) in q's dtype, L (B, H, Nq)
    float32, and visits (B·H, cdiv(Nq, BLOCK_M)) int32: how many key blocks each program loaded.

    window_size = (left, right), −1 for no limit; causal folds in as right = 0. d: 16, 32, 64 or 128.
    """
    require_implemented(window_fwd_kernel)
    require_kernel_dtype(q, k, v)
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"this kernel takes a head dim d of 16, 32, 64 or 128, got {d}")
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Nq, BLOCK_M), B * H)
    visits = torch.zeros((B * H, grid[0]), dtype=torch.int32, device=q.device)
    window_fwd_kernel[grid](q, k, v, o, lse, visits, Nq, Nk, scale, WINDOW_LEFT=left, WINDOW_RIGHT=right,
                            HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return o, lse, visits
