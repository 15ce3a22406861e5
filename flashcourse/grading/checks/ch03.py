"""Chapter 03: the tiled forward pass, O and the logsumexp L, against flashcourse in float64."""

import torch

from ..framework import ChapterChecks, expect
from ._common import attention_cases, expect_lse, expect_output, oracle

CHECKS = ChapterChecks("ch03")


def _forward(m, q, k, v, causal, case, **blocks):
    out = m.tiled_attention_forward(q, k, v, causal=causal, **blocks)
    expect(isinstance(out, tuple) and len(out) == 2,
           f"tiled_attention_forward must return a tuple (O, L), got {type(out).__name__} [{case}]")
    return out


def _check(m, *, output=True, lse=False, blocks=None, **cases):
    blocks = blocks or {}
    for case, q, k, v, causal in attention_cases(**cases):
        case += "".join(f" {name}={b}" for name, b in blocks.items())
        O, L = _forward(m, q, k, v, causal, case, **blocks)
        want_O, want_L = oracle(q, k, v, causal)
        if output:
            expect_output("O vs flashcourse.tiled_attention_forward", O, want_O, q.dtype, case)
        if lse:
            expect_lse("L (logsumexp) vs flashcourse.tiled_attention_forward", L, want_L, q.dtype, case)


@CHECKS.add("tiled_attention_forward", "O, not causal, lengths not multiples of the blocks", points=2,
            hint="the last block is shorter: slicing Q[:, :, i0:i0 + block_m] handles it; rescale O_i by α before adding P̃_ij V_j")
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


@CHECKS.add("tiled_attention_forward", "float16 inputs", hint="compute in float32 (q.float()); return O in q's dtype, L in float32")
def _(m):
    _check(m, lse=True, dtypes=(torch.float16,), shapes=[(1, 2, 33, 40, 16)])
