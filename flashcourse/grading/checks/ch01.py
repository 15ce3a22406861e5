"""Chapter 01: the causal mask and naive attention, against flashcourse.naive_attention in float64."""

import torch

from flashcourse._checks import causal_mask

from ..framework import ATTENTION, ChapterChecks, expect_close
from ._common import EXPLICIT_SCALE, SCALE_HINT, attention_cases, expect_output, large_logit_cases, oracle

CHECKS = ChapterChecks("ch01", file="ch01_naive", notebook="01_naive_attention")
CHECKS.exercise("naive_attention", forbid=ATTENTION)  # the textbook formula, not PyTorch's attention
BOTTOM_RIGHT = "query i sees key j iff j <= i + (Nk − Nq): bottom-right aligned, not j <= i"
BOOL_HINT = "return a boolean tensor: the comparison j <= i + (Nk − Nq) gives one (no .int(), .float() or .long())"


def _mask_check(m, sizes):
    for Nq, Nk in sizes:
        expect_close("causal_mask(Nq, Nk) vs flashcourse's mask", m.causal_mask(Nq, Nk), causal_mask(Nq, Nk),
                     atol=0, case=f"Nq={Nq} Nk={Nk}", dtype=torch.bool, dtype_hint=BOOL_HINT)


@CHECKS.add("causal_mask", "Nq == Nk", hint="the lower triangle including the diagonal: j <= i")
def _(m):
    _mask_check(m, [(1, 1), (5, 5), (17, 17)])


@CHECKS.add("causal_mask", "Nq != Nk, both ways", hint=BOTTOM_RIGHT)
def _(m):
    _mask_check(m, [(3, 7), (7, 3), (1, 9)])


def _attention_check(m, scale=None, **cases):
    extra = {} if scale is None else {"scale": scale}
    for case, q, k, v, causal in attention_cases(**cases):
        want, _ = oracle(q, k, v, causal, scale)
        got = m.naive_attention(q, k, v, causal=causal, **extra)
        expect_output("O vs flashcourse.naive_attention", got, want, q.dtype, case + (f" scale={scale}" if extra else ""))


@CHECKS.add("naive_attention", "float32, not causal", points=2,
            hint="S = scale · Q Kᵀ with scale = 1/sqrt(d); softmax over the last dim (the keys); O = P V")
def _(m):
    _attention_check(m, causal_options=(False,))


@CHECKS.add("naive_attention", "causal, Nq == Nk and Nq != Nk", points=2,
            hint=BOTTOM_RIGHT + "; a row that sees no key gets O = 0, not NaN")
def _(m):
    _attention_check(m, causal_options=(True,))


@CHECKS.add("naive_attention", "explicit scale", hint=SCALE_HINT)
def _(m):
    _attention_check(m, scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)])


@CHECKS.add("naive_attention", "float16 and bfloat16 inputs",
            hint="compute in float32 (q.float()) and return O in q's dtype")
def _(m):
    _attention_check(m, dtypes=(torch.float16, torch.bfloat16), shapes=[(1, 2, 33, 40, 16)])


@CHECKS.add("naive_attention", "float16 at large logits (N = 1024, d = 128)",
            hint="compute in float32 (q.float(), k.float()): in float16, scale · Q Kᵀ of large logits "
                 "loses the digits that exp() needs")
def _(m):
    for case, q, k, v, causal in large_logit_cases(causal_options=(True,)):
        want, _ = oracle(q, k, v, causal)
        expect_output("O vs flashcourse.naive_attention", m.naive_attention(q, k, v, causal=causal), want, q.dtype, case)
