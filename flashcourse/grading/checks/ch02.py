"""Chapter 02: safe softmax, online softmax and merge_states, against flashcourse.softmax."""

import torch

import flashcourse as fc
from flashcourse.softmax import SoftmaxState, block_state, empty_state, finalize

from ..framework import SOFTMAX, ChapterChecks, CheckFailed, case_name, expect, expect_close, randn, tolerance

CHECKS = ChapterChecks("ch02", file="ch02_softmax", notebook="02_online_softmax")
# the softmax written out, not a library's (whose logsumexp is the very max trick of the exercise)
CHECKS.exercise("safe_softmax", forbid=SOFTMAX + ("logsumexp",))
CHECKS.exercise("online_softmax", forbid=SOFTMAX + ("logsumexp",))
SHAPES = [(1, 1), (3, 10), (2, 4, 33), (5, 100)]
NEG_INF = float("-inf")
KEEP_DTYPE = "return the softmax in x's dtype: no .double() or .float() on the way out (or convert back with .to(x.dtype))"


def _rows(scale=1.0, dtypes=(torch.float32, torch.float64), shapes=SHAPES):
    """Yield (case, x) over shapes × dtypes, entries N(0, scale²)."""
    for n, shape in enumerate(shapes):
        for dtype in dtypes:
            yield case_name(shape=tuple(shape), dtype=dtype, logits=scale), randn(*shape, seed=n, dtype=dtype, scale=scale)


def _masked_rows():
    """x (4, 23) with −inf entries (a causal-style mask) and one row entirely −inf."""
    x = randn(4, 23, seed=7, scale=5.0)
    x[0, 5:] = NEG_INF
    x[1, ::2] = NEG_INF
    x[2] = NEG_INF
    return x


def _softmax_check(fn, what, xs, blocks=(None,)):
    for case, x in xs:
        for block in blocks:
            got = fn(x) if block is None else fn(x, block=block)
            want = fc.safe_softmax(x.double())
            expect_close(what, got, want, case=case + ("" if block is None else f" block={block}"),
                         dtype=x.dtype, dtype_hint=KEEP_DTYPE, **tolerance(x.dtype))


@CHECKS.add("safe_softmax", "small logits, float32 and float64", hint="exp(x − max x) / Σ exp(x − max x), over dim=-1")
def _(m):
    _softmax_check(m.safe_softmax, "safe_softmax(x) vs flashcourse.safe_softmax", _rows())


@CHECKS.add("safe_softmax", "large logits (|x| ~ 1000)", hint="subtract the row max before exp: exp(1000) overflows to inf")
def _(m):
    _softmax_check(m.safe_softmax, "safe_softmax(x) vs flashcourse.safe_softmax", _rows(scale=1000.0))


@CHECKS.add("safe_softmax", "masked entries, a row of all −inf",
            hint="an all −inf row has max −inf: subtract 0 there and return 0 where l = 0")
def _(m):
    _softmax_check(m.safe_softmax, "safe_softmax(x) vs flashcourse.safe_softmax", [("4×23 with −inf", _masked_rows())])


@CHECKS.add("safe_softmax", "float16 and bfloat16", hint=KEEP_DTYPE)
def _(m):
    _softmax_check(m.safe_softmax, "safe_softmax(x) vs flashcourse.safe_softmax",
                   _rows(scale=3.0, dtypes=(torch.float16, torch.bfloat16)))


@CHECKS.add("online_softmax", "several blocks (N a multiple of the block)", points=2,
            hint="when the max grows from m to m_new, the old sum must be multiplied by exp(m − m_new)")
def _(m):
    # the max changes from block to block, so a running sum that is not rescaled is far off
    ramp = torch.linspace(0, 50, 48, dtype=torch.float64).repeat(3, 1) + randn(3, 48, seed=3, dtype=torch.float64)
    xs = list(_rows(scale=5.0, shapes=[(3, 64), (2, 4, 32)], dtypes=(torch.float32, torch.float64, torch.float16)))
    xs += list(_rows(scale=30.0, shapes=[(3, 64)])) + [("rising logits 3×48 float64", ramp)]
    _softmax_check(m.online_softmax, "online_softmax(x) vs flashcourse.safe_softmax", xs, blocks=(4, 16))


@CHECKS.add("online_softmax", "N not a multiple of the block", points=2,
            hint="visit blocks x[..., start:start + block] for start in range(0, N, block); the last one is shorter")
def _(m):
    _softmax_check(m.online_softmax, "online_softmax(x) vs flashcourse.safe_softmax", _rows(scale=5.0),
                   blocks=(1, 5, 16, 128))


@CHECKS.add("online_softmax", "one pass: each block's max, then its exponentials, block after block",
            hint="in one loop over blocks: m_new = max(m, max x_b), rescale l by exp(m − m_new), "
                 "add Σ exp(x_b − m_new); only the final normalisation reads x again")
def _(m):
    x, block = randn(3, 100, seed=11, scale=5.0), 16
    got, seen = m.online_softmax.watch("one_pass", x=0, block=block)(x, block=block)
    what = f"online_softmax(x, block={block}) on x of shape (3, 100)"
    v = seen.get("violation")
    if v and v.get("rule") == "whole":
        lo, hi = v.get("columns", [0, 0])
        raise CheckFailed(f"{what} reduced columns {lo}..{hi - 1} of x at once (torch.{v.get('op')}): every max "
                          f"and sum must stay inside one block of {block} columns",
                          "reduce x[..., start:start + block] only, and merge it into the running (m, l)")
    if v:
        lo, hi = v.get("columns", [0, 0])
        p0, p1 = v.get("pending", [0, 0])
        raise CheckFailed(f"{what} took the max of columns {lo}..{hi - 1} before the exponentials of columns "
                          f"{p0}..{p1 - 1}: that is two passes over x, not one")
    _softmax_check(lambda x, block: got, "online_softmax(x) vs flashcourse.safe_softmax", [("3×100", x)], blocks=(block,))


@CHECKS.add("online_softmax", "masked entries, a row of all −inf", hint="while m is still −inf, subtract 0 instead of m (no NaN)")
def _(m):
    _softmax_check(m.online_softmax, "online_softmax(x) vs flashcourse.safe_softmax", [("4×23 with −inf", _masked_rows())],
                   blocks=(3, 8))


@CHECKS.driver
def merge(module, a, b):
    """Worker side: the learner's merge_states on two SoftmaxStates (they travel as plain tuples)."""
    return module.merge_states(SoftmaxState(*a), SoftmaxState(*b))


def _states(n, d, cut, seed, scale=10.0):
    """The states (with values when d) of s[:, :cut] and s[:, cut:] and of the whole row, for 3 rows."""
    s = randn(3, n, seed=seed, dtype=torch.float64, scale=scale)
    v = randn(n, d, seed=seed + 1, dtype=torch.float64) if d else None
    part = lambda lo, hi: block_state(s[:, lo:hi], None if v is None else v[lo:hi])  # noqa: E731
    return part(0, cut), part(cut, n), part(0, n)


def _expect_state(got, want, case):
    expect(isinstance(got, tuple) and len(got) == 3,
           f"merge_states must return SoftmaxState(m, l, o), got {type(got).__name__} [{case}]",
           "return SoftmaxState(m, l, o)")
    expect_close("m of merge_states(a, b) vs flashcourse.merge_states", got[0], want.m, atol=1e-12, case=case)
    expect_close("l of merge_states(a, b) vs flashcourse.merge_states", got[1], want.l, atol=1e-9, rtol=1e-9, case=case)
    if want.o is None:
        expect(got[2] is None, f"o of merge_states(a, b) must stay None when a.o is None [{case}]")
    else:
        expect_close("o of merge_states(a, b) vs flashcourse.merge_states", got[2], want.o, atol=1e-9, rtol=1e-9, case=case)


@CHECKS.add("merge_states", "m and l of two slices", hint="m = max(m_a, m_b); l = exp(m_a − m) l_a + exp(m_b − m) l_b")
def _(m):
    for n, cut, seed in [(10, 4, 0), (33, 1, 1), (64, 40, 2)]:
        a, b, whole = _states(n, 0, cut, seed)
        case = f"3 rows, slices [0:{cut}] and [{cut}:{n}]"
        _expect_state(m.run("merge", a, b), fc.merge_states(a, b), case)
        _expect_state(m.run("merge", b, a), whole, case + ", merged b with a")


@CHECKS.add("merge_states", "o rescaled with l", points=2, hint="o = α o_a + β o_b with α = exp(m_a − m)[..., None]")
def _(m):
    for n, d, cut, seed in [(10, 4, 4, 3), (47, 8, 30, 4)]:
        a, b, whole = _states(n, d, cut, seed)
        case = f"3 rows, d={d}, slices [0:{cut}] and [{cut}:{n}]"
        got = m.run("merge", a, b)
        _expect_state(got, fc.merge_states(a, b), case)
        O, _ = finalize(whole)
        expect_close("o / l of merge_states(a, b) vs softmax(s) v", got[2] / got[1][..., None], O, atol=1e-9, case=case)


@CHECKS.add("merge_states", "with empty states (m = −inf)", hint="where m is −inf, subtract 0 instead: exp(−inf − (−inf)) is NaN")
def _(m):
    a, _, _ = _states(12, 4, 12, 5)
    empty = empty_state((3,), d=4, dtype=torch.float64)
    _expect_state(m.run("merge", empty, a), a, "empty with a state")
    _expect_state(m.run("merge", empty, empty), empty, "empty with empty")
