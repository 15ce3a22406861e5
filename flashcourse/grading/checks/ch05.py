"""Chapter 05: the Triton forward kernel, O and L, against flashcourse's float64 reference."""

import torch

from ..framework import ChapterChecks
from ._common import EXPLICIT_SCALE, KEYS, SCALE_HINT, check_forward, device, kernel_dtypes, large_logit_cases

CHECKS = ChapterChecks("ch05", file="ch05_triton_forward", notebook="05_triton_forward")
# (B, H, Nq, Nk, d): one query, lengths not multiples of the blocks, Nq != Nk both ways; d in 16, 32
SHAPES = [(1, 1, 1, 1, 16), (1, 2, 37, 37, 16), (1, 1, 21, 50, 32), (2, 1, 40, 18, 16)]


def _check(m, **kwargs):
    check_forward(m.flash_attention_forward, "flash_attention_forward", kernel=True, **{"shapes": SHAPES, **kwargs})


@CHECKS.add("attention_fwd_kernel", "O, not causal, ragged lengths", points=3,
            hint="mask keys past Nk with −inf before the row max; "
                 "rescale acc by α before adding P̃ V_j; divide by l_i at the end")
def _(m):
    _check(m, causal_options=(False,))


@CHECKS.add("attention_fwd_kernel", "O, causal (Nq == Nk, Nq < Nk, Nq > Nk)", points=3,
            hint="visible iff offs_n[None, :] <= offs_m[:, None] + Nk − Nq; a row with no visible key must give 0, not NaN")
def _(m):
    _check(m, causal_options=(True,))


@CHECKS.add("attention_fwd_kernel", "L = logsumexp (natural log)", points=2,
            hint="m_i and the scores are in base 2: L_i = (m_i + log2 l_i) · ln 2; store it under the mask offs_m < Nq")
def _(m):
    _check(m, output=False, lse=True)


@CHECKS.add("attention_fwd_kernel", "explicit scale", hint=SCALE_HINT + " (the launcher passes it to the kernel)")
def _(m):
    _check(m, lse=True, scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)])


@CHECKS.add("attention_fwd_kernel", "float16 (bfloat16 on a GPU), and other block sizes",
            hint="tl.dot(p.to(v.dtype), v) feeds the inputs' dtype to the dot; "
                 "keep m_i, l_i and acc in float32; use BLOCK_M/BLOCK_N as given")
def _(m):
    _check(m, lse=True, dtypes=kernel_dtypes()[1:], shapes=[(1, 2, 33, 40, 16)])
    _check(m, lse=True, blocks={"BLOCK_M": 32, "BLOCK_N": 16}, shapes=[(1, 1, 45, 29, 16)])


@CHECKS.add("attention_fwd_kernel", "float16 at large logits (1024 keys, d = 128, 64-row blocks)",
            hint="keep the running max, sum and accumulator in float32, and subtract the running max before exp2")
def _(m):
    _check(m, lse=True, blocks={"BLOCK_M": 64, "BLOCK_N": 64}, cases=large_logit_cases(KEYS, on=device(), causal_options=(True,)))
