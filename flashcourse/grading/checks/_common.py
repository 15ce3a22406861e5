"""Cases and oracles the attention chapters share."""

import torch

import flashcourse as fc

from ..framework import case_name, expect_close, qkv, tolerance

# (B, H, Nq, Nk, d): a single query, lengths that are not multiples of any block, Nq != Nk both ways
SHAPES = [(1, 1, 1, 1, 8), (2, 3, 17, 17, 16), (1, 2, 37, 70, 32), (1, 2, 45, 20, 16)]


def oracle(q, k, v, causal: bool, scale=None):
    """(O, L) of flashcourse.naive_attention in float64: the ground truth."""
    return fc.naive_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, return_lse=True)


def attention_cases(*, causal_options=(False, True), dtypes=(torch.float32,), shapes=SHAPES, seed=0):
    """Yield (case name, q, k, v, causal) over shapes × causal × dtypes."""
    for n, (B, H, Nq, Nk, d) in enumerate(shapes):
        for causal in causal_options:
            for dtype in dtypes:
                q, k, v = qkv(B, H, Nq, Nk, d, seed=seed + 10 * n, dtype=dtype)
                yield case_name(B=B, H=H, Nq=Nq, Nk=Nk, d=d, dtype=dtype, causal=causal), q, k, v, causal


def expect_output(what: str, got, want, dtype, case: str) -> None:
    """got is O (B, H, Nq, d) in the inputs' dtype and close to the float64 oracle."""
    expect_close(what, got, want, case=case, dtype=dtype, **tolerance(dtype))


def expect_lse(what: str, got, want, dtype, case: str) -> None:
    """got is L (B, H, Nq) in float32 (float64 for float64 inputs) and close to the float64 oracle."""
    expect_close(what, got, want, case=case, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                 **tolerance(torch.float32))
