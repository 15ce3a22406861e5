"""Chapter 03: the tiled forward pass, O and the logsumexp L, against flashcourse in float64."""

import torch

from ..framework import ChapterChecks, qkv
from ._common import check_forward, expect_tiled

CHECKS = ChapterChecks("ch03")


def _check(m, **kwargs):
    check_forward(m.tiled_attention_forward, "tiled_attention_forward", **kwargs)


@CHECKS.add("tiled_attention_forward", "O, not causal, lengths not multiples of the blocks", points=2,
            hint="the last block is shorter: slicing Q[:, :, i0:i0 + block_m] handles it; "
                 "rescale O_i by α before adding P̃_ij V_j")
def _(m):
    _check(m, causal_options=(False,))


@CHECKS.add("tiled_attention_forward", "O, causal (Nq == Nk, Nq < Nk, Nq > Nk)", points=2,
            hint="mask with absolute positions: key j0 + c is hidden from query i0 + r iff j0 + c > i0 + r + Nk − Nq")
def _(m):
    _check(m, causal_options=(True,))


@CHECKS.add("tiled_attention_forward", "L = logsumexp of each score row", points=2,
            hint="L_i = m_i + log l_i (natural log, of the scaled scores), −inf for a row that sees no key, float32")
def _(m):
    _check(m, output=False, lse=True)


@CHECKS.add("tiled_attention_forward", "other block sizes (B_r != B_c, larger than N)",
            hint="use block_m and block_n as given: B_r for the query blocks, B_c for the key blocks")
def _(m):
    for blocks in ({"block_m": 8, "block_n": 5}, {"block_m": 3, "block_n": 64}):
        _check(m, lse=True, blocks=blocks, shapes=[(1, 2, 19, 27, 8), (1, 1, 21, 13, 8)])


@CHECKS.add("tiled_attention_forward", "float16 inputs",
            hint="compute in float32 (q.float()); return O in q's dtype, L in float32")
def _(m):
    _check(m, lse=True, dtypes=(torch.float16,), shapes=[(1, 2, 33, 40, 16)])


@CHECKS.add("tiled_attention_forward", "tile by tile: never the whole Nq × Nk score matrix",
            hint="compute S_ij = scale · Q_i K_jᵀ inside the loops, for one (block_m, block_n) tile at a time")
def _(m):
    q, k, v = qkv(1, 2, 70, 45, 16, seed=5)
    expect_tiled("tiled_attention_forward", lambda: m.tiled_attention_forward(q, k, v), 70, 45)
