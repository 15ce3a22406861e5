"""Chapter 03: the tiled forward pass, O and the logsumexp L, against flashcourse in float64."""

import torch

from ..framework import ATTENTION, ChapterChecks, qkv
from ._common import (EXPLICIT_SCALE, ROLES, SCALE_HINT, TILED, check_forward, expect_tiles, large_logit_cases,
                      oracle, expect_output)

CHECKS = ChapterChecks("ch03", file="ch03_tiling", notebook="03_tiling")
CHECKS.exercise("tiled_attention_forward", forbid=ATTENTION)


def _check(m, **kwargs):
    check_forward(m.tiled_attention_forward, "tiled_attention_forward", **kwargs)


@CHECKS.add("tiled_attention_forward", "O, not causal, lengths not multiples of the blocks", points=2,
            hint="the last block is shorter: slicing Q[:, :, i0:i0 + block_m] handles it; "
                 "rescale O_i by α before adding P̃_ij V_j")
def _(m):
    _check(m, causal_options=(False,))


@CHECKS.add("tiled_attention_forward", "tile by tile: no score tensor (or mask) beyond one block_m × block_n tile",
            hint="compute S_ij = scale · Q_i K_jᵀ and its causal mask inside both loops, for one (block_m, block_n) "
                 "tile at a time")
def _(m):
    T = TILED
    q, k, v = qkv(T["B"], T["H"], T["Nq"], T["Nk"], T["d"], seed=5)
    blocks = {"block_m": T["block_m"], "block_n": T["block_n"]}
    call = m.tiled_attention_forward.watch("tiles", roles=ROLES, Nq=T["Nq"], Nk=T["Nk"], **blocks)
    for causal in (False, True):
        got, seen = call(q, k, v, causal=causal, **blocks)
        expect_tiles("tiled_attention_forward", seen)
        want, _ = oracle(q, k, v, causal)
        expect_output("O vs flashcourse", got[0] if isinstance(got, tuple) else got, want, q.dtype,
                      "B=1 H=2 Nq=70 Nk=45 d=16 block_m=12 block_n=7" + (" causal" if causal else ""))


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


@CHECKS.add("tiled_attention_forward", "explicit scale", hint=SCALE_HINT)
def _(m):
    _check(m, lse=True, scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)])


@CHECKS.add("tiled_attention_forward", "float16 and bfloat16, and float16 at large logits",
            hint="compute in float32 (q.float()); return O in q's dtype, L in float32")
def _(m):
    _check(m, lse=True, dtypes=(torch.float16, torch.bfloat16), shapes=[(1, 2, 33, 40, 16)])
    _check(m, lse=True, blocks={"block_m": 64, "block_n": 64}, cases=large_logit_cases(causal_options=(True,)))
