"""Chapter 06: D = rowsum(dO∘O), the backward pass with whole matrices and tile by tile, against
flashcourse.naive_attention_backward in float64."""

import torch

from ..framework import ATTENTION, AUTOGRAD, ChapterChecks, expect_close, qkv, randn, tolerance
from ._common import (EXPLICIT_SCALE, ROLES, SCALE_HINT, TILED, attention_cases, backward_case, exact_grads,
                      expect_grads, expect_tiles, large_logit_cases)

CHECKS = ChapterChecks("ch06", file="ch06_backward", notebook="06_backward_math")
# the gradients from the formulas: not from autograd (which would differentiate the forward for you)
CHECKS.exercise("naive_backward", forbid=AUTOGRAD + ATTENTION)
CHECKS.exercise("tiled_backward", forbid=AUTOGRAD + ATTENTION)


@CHECKS.add("backward_delta", "D = rowsum(dO ∘ O), float32, float16 and bfloat16",
            hint="(do.float() * o.float()).sum(dim=-1): one float32 number per query row")
def _(m):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        o, do = randn(2, 3, 21, 16, seed=1, dtype=dtype), randn(2, 3, 21, 16, seed=2, dtype=dtype)
        want = (o.double() * do.double()).sum(dim=-1)
        expect_close("backward_delta(o, do) vs rowsum(dO ∘ O)", m.backward_delta(o, do), want, case=str(dtype),
                     dtype=torch.float32, dtype_hint="return D in float32 whatever the dtype of o and do",
                     **tolerance(torch.float32))


def _grad_check(m, fn: str, tiled: bool, scale=None, blocks=None, cases=None, **case_options):
    blocks = blocks or {}
    for case, q, k, v, causal in cases if cases is not None else attention_cases(**case_options):
        o, lse, do, want = backward_case(q, k, v, causal, scale)
        args = (q, k, v, o, lse, do) if tiled else (q, k, v, o, do)
        kwargs = {"causal": causal, **({} if scale is None else {"scale": scale}), **blocks}
        case += "".join(f" {name}={b}" for name, b in kwargs.items() if name != "causal")
        exact = lambda: exact_grads(q, k, v, do, causal, scale)  # noqa: E731
        expect_grads(f"{fn}(...)", getattr(m, fn)(*args, **kwargs), want, (q, k, v), case, exact=exact)


@CHECKS.add("naive_backward", "not causal", points=2,
            hint="dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ = scale · dS K, dK = scale · dSᵀ Q")
def _(m):
    _grad_check(m, "naive_backward", False, causal_options=(False,))


@CHECKS.add("naive_backward", "causal", hint="mask S before the softmax (rows with no key: P = 0)")
def _(m):
    _grad_check(m, "naive_backward", False, causal_options=(True,))


@CHECKS.add("naive_backward", "explicit scale", hint=SCALE_HINT + "; the scale goes into S and into dQ, dK, not dV")
def _(m):
    _grad_check(m, "naive_backward", False, scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)])


@CHECKS.add("naive_backward", "float16 and bfloat16, and float16 at large logits",
            hint="compute in float32; return dq like q and dk, dv like k, v (their dtype)")
def _(m):
    _grad_check(m, "naive_backward", False, dtypes=(torch.float16, torch.bfloat16), shapes=[(1, 2, 33, 40, 16)])
    _grad_check(m, "naive_backward", False, cases=large_logit_cases(causal_options=(True,)))


@CHECKS.add("tiled_backward", "not causal, lengths not multiples of the blocks", points=2,
            hint="P_ij = exp(S_ij − L_i) needs no max: L already normalises; accumulate dK_j, dV_j over all i")
def _(m):
    _grad_check(m, "tiled_backward", True, causal_options=(False,))


@CHECKS.add("tiled_backward", "tile by tile: no score tensor (or mask) beyond one block_m × block_n tile",
            hint="recompute P_ij, dP_ij, dS_ij and the causal mask inside both loops, for one (block_m, block_n) tile "
                 "at a time")
def _(m):
    T = TILED
    q, k, v = qkv(T["B"], T["H"], T["Nq"], T["Nk"], T["d"], seed=5)
    blocks = {"block_m": T["block_m"], "block_n": T["block_n"]}
    call = m.tiled_backward.watch("tiles", roles=ROLES, Nq=T["Nq"], Nk=T["Nk"], **blocks)
    for causal in (False, True):
        o, lse, do, want = backward_case(q, k, v, causal)
        got, seen = call(q, k, v, o, lse, do, causal=causal, **blocks)
        expect_tiles("tiled_backward", seen)
        expect_grads("tiled_backward(...)", got, want, (q, k, v), "B=1 H=2 Nq=70 Nk=45 d=16 block_m=12 block_n=7" +
                     (" causal" if causal else ""), exact=lambda: exact_grads(q, k, v, do, causal))


@CHECKS.add("tiled_backward", "causal (Nq == Nk, Nq < Nk, Nq > Nk)", points=2,
            hint="mask S_ij with absolute positions (j0 + c > i0 + r + Nk − Nq); where L_i = −inf subtract 0 instead")
def _(m):
    _grad_check(m, "tiled_backward", True, causal_options=(True,))


@CHECKS.add("tiled_backward", "other blocks, explicit scale",
            hint="use block_m for the query blocks and block_n for the key blocks; " + SCALE_HINT)
def _(m):
    _grad_check(m, "tiled_backward", True, blocks={"block_m": 8, "block_n": 5}, shapes=[(1, 2, 19, 27, 8)])
    _grad_check(m, "tiled_backward", True, scale=EXPLICIT_SCALE, shapes=[(1, 1, 21, 13, 8)])


@CHECKS.add("tiled_backward", "float16 and bfloat16, and float16 at large logits",
            hint="compute in float32, cast at the end: dq like q, dk like k, dv like v")
def _(m):
    _grad_check(m, "tiled_backward", True, dtypes=(torch.float16, torch.bfloat16), shapes=[(1, 2, 33, 40, 16)])
    _grad_check(m, "tiled_backward", True, blocks={"block_m": 64, "block_n": 64},
                cases=large_logit_cases(causal_options=(True,)))
