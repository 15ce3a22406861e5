"""Chapter 07: the Triton dK/dV and dQ kernels, against flashcourse.naive_attention_backward in float64."""

import torch

from ..framework import ChapterChecks, expect, expect_close, tolerance
from ._common import (EXPLICIT_SCALE, KEYS, QUERIES, SCALE_HINT, attention_cases, backward_case, device, kernel_dtypes,
                      large_logit_cases)
from .ch05 import SHAPES

CHECKS = ChapterChecks("ch07", file="ch07_triton_backward", notebook="07_triton_backward")


def _check(m, which: str, blocks=None, scale=None, cases=None, loose: float = 1.0, **case_options):
    """which: 'dkdv' compares (dk, dv) of backward_dkdv, 'dq' the dq of backward_dq; loose widens the tolerance."""
    extra = {**({} if scale is None else {"scale": scale}), **(blocks or {})}
    cases = cases if cases is not None else attention_cases(on=device(), **{"shapes": SHAPES, **case_options})
    for case, q, k, v, causal in cases:
        o, lse, do, (dq, dk, dv) = backward_case(q, k, v, causal, scale)
        case += "".join(f" {name}={b}" for name, b in extra.items())
        if which == "dkdv":
            got = m.backward_dkdv(q, k, v, o, lse, do, causal=causal, **extra)
            expect(isinstance(got, tuple) and len(got) == 2, f"backward_dkdv must return (dk, dv) [{case}]")
            pairs = [("dk", got[0], dk), ("dv", got[1], dv)]
        else:
            pairs = [("dq", m.backward_dq(q, k, v, o, lse, do, causal=causal, **extra), dq)]
        for name, g, w in pairs:
            expect_close(f"{name} vs flashcourse.naive_attention_backward", g, w, case=case, dtype=q.dtype,
                         **{k: loose * t for k, t in tolerance(q.dtype, kernel=True).items()})


@CHECKS.add("dkdv_kernel", "not causal, ragged lengths", points=3,
            hint="dV_j += P_ijᵀ dO_i and dK_j += dS_ijᵀ Q_i over every query block; "
                 "hide query rows past Nq; scale dK once at the end")
def _(m):
    _check(m, "dkdv", causal_options=(False,))


@CHECKS.add("dkdv_kernel", "causal (Nq == Nk, Nq < Nk, Nq > Nk)", points=2,
            hint="in the transposed tile, visible iff offs_n[:, None] <= offs_m[None, :] + Nk − Nq; use tl.where, not a product")
def _(m):
    _check(m, "dkdv", causal_options=(True,))


@CHECKS.add("dq_kernel", "not causal, ragged lengths", points=3,
            hint="dQ_i += dS_ij K_j over every key block, keys past Nk hidden; dS_ij = P_ij ∘ (dO_i V_jᵀ − D_i)")
def _(m):
    _check(m, "dq", causal_options=(False,))


@CHECKS.add("dq_kernel", "causal (Nq == Nk, Nq < Nk, Nq > Nk)", points=2,
            hint="visible iff offs_n[None, :] <= offs_m[:, None] + Nk − Nq; P_ij = 0 where hidden, even where L_i = −inf")
def _(m):
    _check(m, "dq", causal_options=(True,))


@CHECKS.add("dkdv_kernel", "explicit scale", hint=SCALE_HINT + ": S_ij uses it, and dK once at the end")
def _(m):
    _check(m, "dkdv", scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)])


@CHECKS.add("dq_kernel", "explicit scale", hint=SCALE_HINT + ": S_ij uses it, and dQ once at the end")
def _(m):
    _check(m, "dq", scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)])


@CHECKS.add("dkdv_kernel", "float16 (bfloat16 on a GPU), other block sizes, large logits (1024 queries, d = 128)",
            hint="cast P and dS to the inputs' dtype before tl.dot; use BLOCK_M/BLOCK_N as given")
def _(m):
    _check(m, "dkdv", dtypes=kernel_dtypes()[1:], shapes=[(1, 2, 33, 40, 16)])
    _check(m, "dkdv", blocks={"BLOCK_M": 32, "BLOCK_N": 16}, shapes=[(1, 1, 45, 29, 16)])
    # dK, dV sum 1024 products of P and dS rounded to float16 (as FlashAttention does): twice the tolerance
    _check(m, "dkdv", blocks={"BLOCK_M": 64, "BLOCK_N": 64}, cases=large_logit_cases(QUERIES, on=device()), loose=2.0)


@CHECKS.add("dq_kernel", "float16 (bfloat16 on a GPU), other block sizes, large logits (1024 keys, d = 128)",
            hint="cast dS to k's dtype before tl.dot; use BLOCK_M/BLOCK_N as given")
def _(m):
    _check(m, "dq", dtypes=kernel_dtypes()[1:], shapes=[(1, 2, 33, 40, 16)])
    _check(m, "dq", blocks={"BLOCK_M": 32, "BLOCK_N": 16}, shapes=[(1, 1, 45, 29, 16)])
    # dQ sums 1024 products of dS rounded to float16 (as FlashAttention does): twice the tolerance
    _check(m, "dq", blocks={"BLOCK_M": 64, "BLOCK_N": 64}, cases=large_logit_cases(KEYS, on=device(), causal_options=(True,)),
           loose=2.0)
