"""Chapter 01: the causal mask and naive attention, against flashcourse.naive_attention in float64."""

import torch

from flashcourse._checks import causal_mask

from ..framework import ChapterChecks, expect_close
from ._common import attention_cases, expect_output, oracle

CHECKS = ChapterChecks("ch01")
BOTTOM_RIGHT = "query i sees key j iff j <= i + (Nk − Nq): bottom-right aligned, not j <= i"


def _mask_check(m, sizes):
    for Nq, Nk in sizes:
        expect_close("causal_mask(Nq, Nk) vs flashcourse's mask", m.causal_mask(Nq, Nk), causal_mask(Nq, Nk),
                     atol=0, case=f"Nq={Nq} Nk={Nk}", dtype=torch.bool)


@CHECKS.add("causal_mask", "Nq == Nk", hint="the lower triangle including the diagonal: j <= i")
def _(m):
    _mask_check(m, [(1, 1), (5, 5), (17, 17)])


@CHECKS.add("causal_mask", "Nq != Nk, both ways", hint=BOTTOM_RIGHT)
def _(m):
    _mask_check(m, [(3, 7), (7, 3), (1, 9)])


def _attention_check(m, **cases):
    for case, q, k, v, causal in attention_cases(**cases):
        want, _ = oracle(q, k, v, causal)
        expect_output("O vs flashcourse.naive_attention", m.naive_attention(q, k, v, causal=causal), want, q.dtype, case)


@CHECKS.add("naive_attention", "float32, not causal", points=2,
            hint="S = scale · Q Kᵀ with scale = 1/sqrt(d); softmax over the last dim (the keys); O = P V")
def _(m):
    _attention_check(m, causal_options=(False,))


@CHECKS.add("naive_attention", "causal, Nq == Nk and Nq != Nk", points=2,
            hint=BOTTOM_RIGHT + "; a row that sees no key gets O = 0, not NaN")
def _(m):
    _attention_check(m, causal_options=(True,))


@CHECKS.add("naive_attention", "float16 inputs", hint="compute in float32 (q.float()) and return O in q's dtype")
def _(m):
    _attention_check(m, dtypes=(torch.float16,), shapes=[(1, 2, 33, 40, 16)])


@CHECKS.add("naive_attention", "explicit scale", hint="use the scale argument when it is given, once (not on top of 1/sqrt(d))")
def _(m):
    for case, q, k, v, causal in attention_cases(shapes=[(1, 2, 19, 23, 16)]):
        want, _ = oracle(q, k, v, causal, scale=0.3)
        got = m.naive_attention(q, k, v, causal=causal, scale=0.3)
        expect_output("O vs flashcourse.naive_attention(scale=0.3)", got, want, q.dtype, case)
