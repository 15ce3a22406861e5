"""Chapter 10: a sliding window in the Triton forward kernel, against flashcourse.naive_attention(window_size=...).

Besides O and L, the given launcher returns how many key blocks each program loaded (the given
``load_kv`` counts them): a program may load only blocks that some row of its query block can see.
"""

import torch

from ..framework import ChapterChecks, CheckFailed, expect, expect_tensor
from ._common import (EXPLICIT_SCALE, KEYS, attention_cases, device, expect_lse, expect_output, kernel_dtypes,
                      large_logit_cases, oracle)

CHECKS = ChapterChecks("ch10", file="ch10_window", notebook="10_beyond")
# (B, H, Nq, Nk, d): lengths not multiples of the blocks, Nq != Nk both ways
SHAPES = [(1, 2, 37, 70, 16), (1, 1, 45, 20, 16), (2, 1, 33, 33, 32)]
WINDOW_HINT = ("query i sees key j iff i + Nk − Nq − left <= j <= i + Nk − Nq + right (a side of −1 has no limit): "
               "mask with both edges, bottom-right aligned")
SKIP_HINT = ("start the loop at the block of max(start_m + Nk − Nq − left, 0) (rounded down to BLOCK_N) and end it at "
             "min(start_m + BLOCK_M + Nk − Nq + right, Nk); load each block with the given load_kv")


def visit_range(Nq: int, Nk: int, window: tuple, causal: bool, p: int, BLOCK_M: int, BLOCK_N: int) -> tuple:
    """(fewest, most) key blocks program p may load: fewest covers the keys its real rows see, most is every
    block of B_c keys that its B_r rows (those past Nq included) can see."""
    left, right = window
    right = 0 if causal else right
    offset = Nk - Nq

    def seen(first: int, last: int):  # the keys rows first..last see: [lo, hi], or None
        lo = max(first + offset - left, 0) if left >= 0 else 0
        hi = min(last + offset + right, Nk - 1) if right >= 0 else Nk - 1
        return (lo, hi) if lo <= hi else None

    start = p * BLOCK_M
    real, padded = seen(start, min(start + BLOCK_M, Nq) - 1), seen(start, start + BLOCK_M - 1)
    fewest = -(-(real[1] - real[0] + 1) // BLOCK_N) if real else 0
    most = padded[1] // BLOCK_N - padded[0] // BLOCK_N + 1 if padded else 0
    return fewest, most


def _check(m, windows, *, visits=False, lse=False, blocks=None, scale=None, cases=None, **case_options):
    """windowed_attention_forward(q, k, v, causal, window_size, ...) against the float64 oracle, for every
    case and window; visits: also the key blocks each program loaded."""
    blocks = blocks or {}
    extra = {**({} if scale is None else {"scale": scale}), **blocks}
    cases = cases if cases is not None else attention_cases(on=device(), **{"shapes": SHAPES, **case_options})
    for case, q, k, v, causal in cases:
        for window in windows:
            where = f"{case} window_size={window}" + "".join(f" {n}={b}" for n, b in extra.items())
            out = m.windowed_attention_forward(q, k, v, causal=causal, window_size=window, **extra)
            expect(isinstance(out, tuple) and len(out) == 3,
                   f"windowed_attention_forward must return (O, L, visits), got {type(out).__name__} [{where}]",
                   "keep the given launcher: it returns O, L and the visits that load_kv counted")
            want_O, want_L = oracle(q, k, v, causal, scale, window_size=window)
            expect_output("O vs flashcourse", out[0], want_O, q.dtype, where, kernel=True)
            if lse:
                expect_lse("L vs flashcourse", out[1], want_L, q.dtype, where, kernel=True)
            if visits:
                _expect_visits(out[2], q.shape[0] * q.shape[1], q.shape[2], k.shape[2], window, causal, blocks, where)


def _expect_visits(got, heads: int, Nq: int, Nk: int, window, causal: bool, blocks: dict, where: str) -> None:
    BLOCK_M, BLOCK_N = blocks.get("BLOCK_M", 16), blocks.get("BLOCK_N", 16)
    programs = -(-Nq // BLOCK_M)
    expect_tensor("the key blocks each program loaded", got, (heads, programs), dtype=torch.int32, case=where)
    if not bool(got.any()):
        raise CheckFailed(f"no program loaded a key block through load_kv [{where}]",
                          "load every key and value block with the given load_kv(...): it counts the visits")
    for p in range(programs):
        fewest, most = visit_range(Nq, Nk, window, causal, p, BLOCK_M, BLOCK_N)
        loaded = got[:, p]
        if bool((loaded > most).any()) or bool((loaded < fewest).any()):
            n = int(loaded.max() if bool((loaded > most).any()) else loaded.min())
            more = "key blocks that no row of it can see" if n > most else "fewer key blocks than its rows see"
            raise CheckFailed(f"query block {p} (rows {p * BLOCK_M}…{min((p + 1) * BLOCK_M, Nq) - 1}) loaded {n} key "
                              f"blocks, {more}: {fewest}" + (f" to {most}" if most != fewest else "") +
                              f" of {-(-Nk // BLOCK_N)} [{where}]", SKIP_HINT)


@CHECKS.add("window_fwd_kernel", "O, a window to the left (a sliding window), ragged lengths", points=3,
            hint=WINDOW_HINT)
def _(m):
    _check(m, [(5, -1), (40, -1)], causal_options=(False,), shapes=SHAPES[:2])
    _check(m, [(0, -1), (-1, -1)], causal_options=(False,), shapes=SHAPES[2:])


@CHECKS.add("window_fwd_kernel", "key blocks wholly outside the window are never loaded", points=3, hint=SKIP_HINT)
def _(m):
    _check(m, [(20, -1), (3, 2)], visits=True, causal_options=(False,), shapes=[(1, 1, 16, 128, 16), (1, 2, 45, 20, 16)])
    _check(m, [(-1, 5)], visits=True, causal_options=(False,), shapes=[(1, 1, 70, 70, 16)])
    _check(m, [(7, -1)], visits=True, causal_options=(True,), shapes=[(1, 1, 70, 70, 16)])
    _check(m, [(-1, -1)], visits=True, causal_options=(True,), shapes=[(1, 1, 37, 70, 16)])
    _check(m, [(10, 0)], visits=True, blocks={"BLOCK_M": 32, "BLOCK_N": 16}, shapes=[(1, 1, 70, 70, 16)],
           causal_options=(False,))


@CHECKS.add("window_fwd_kernel", "causal with a window: (left, 0)", points=2,
            hint="causal is the window's right edge at 0: the launcher passes WINDOW_RIGHT = 0; "
                 "query i sees keys i + Nk − Nq − left … i + Nk − Nq")
def _(m):
    _check(m, [(6, -1)], causal_options=(True,))
    _check(m, [(0, -1), (-1, -1)], causal_options=(True,), shapes=SHAPES[1:2])


@CHECKS.add("window_fwd_kernel", "a window on both sides, (left, right) and (−1, right)", points=2, hint=WINDOW_HINT)
def _(m):
    _check(m, [(3, 2), (-1, 4)], causal_options=(False,), shapes=SHAPES[:2])


@CHECKS.add("window_fwd_kernel", "L = logsumexp, and rows whose window holds no key", points=2,
            hint="a row that sees no key (its window lies before key 0 or past Nk) gets O = 0 and L = −inf: "
                 "divide by l_i only where l_i > 0")
def _(m):
    _check(m, [(2, -1)], lse=True, causal_options=(True,), shapes=SHAPES[:2])
    _check(m, [(4, 1)], lse=True, causal_options=(False,), shapes=SHAPES[:2])


@CHECKS.add("window_fwd_kernel", "float16 (bfloat16 on a GPU), other block sizes, explicit scale, large logits",
            hint="keep m_i, l_i and acc in float32; use BLOCK_M/BLOCK_N and the scale as given")
def _(m):
    _check(m, [(5, 2)], lse=True, dtypes=kernel_dtypes()[1:], shapes=[(1, 2, 33, 40, 16)])
    _check(m, [(11, -1)], lse=True, blocks={"BLOCK_M": 32, "BLOCK_N": 16}, shapes=[(1, 1, 45, 29, 16)],
           causal_options=(True,))
    _check(m, [(4, 3)], lse=True, scale=EXPLICIT_SCALE, shapes=[(1, 2, 19, 23, 16)], causal_options=(False,))
    _check(m, [(300, -1)], lse=True, blocks={"BLOCK_M": 64, "BLOCK_N": 64}, cases=large_logit_cases(KEYS, on=device(),
                                                                                                causal_options=(True,)))
