"""Chapter 02: safe softmax, online softmax and merge_states, against flashcourse.softmax."""

import torch

import flashcourse as fc
from flashcourse.softmax import block_state, empty_state, finalize

from ..framework import ChapterChecks, case_name, expect, expect_close, randn, tolerance
from ._common import Watch

CHECKS = ChapterChecks("ch02")
SHAPES = [(1, 1), (3, 10), (2, 4, 33), (5, 100)]
NEG_INF = float("-inf")


def _rows(scale=1.0, dtypes=(torch.float32, torch.float64)):
    """Yield (case, x) over SHAPES × dtypes, entries N(0, scale²)."""
    for n, shape in enumerate(SHAPES):
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
                         dtype=x.dtype, **tolerance(x.dtype))


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


@CHECKS.add("safe_softmax", "float16", hint="keep the dtype of x: no .double() or .float() on the way out")
def _(m):
    _softmax_check(m.safe_softmax, "safe_softmax(x) vs flashcourse.safe_softmax", _rows(scale=3.0, dtypes=(torch.float16,)))


@CHECKS.add("online_softmax", "N a multiple of the block, and not", points=2,
            hint="visit blocks x[..., start:start + block] for start in range(0, N, block); the last one may be shorter")
def _(m):
    _softmax_check(m.online_softmax, "online_softmax(x) vs flashcourse.safe_softmax", _rows(), blocks=(1, 5, 16, 128))


@CHECKS.add("online_softmax", "large logits: the running sum is rescaled", points=2,
            hint="when the max grows from m to m_new, the old sum must be multiplied by exp(m − m_new)")
def _(m):
    # increasing logits: the max changes in every block, so a sum that is not rescaled is far off
    ramp = torch.linspace(0, 50, 40, dtype=torch.float64).repeat(3, 1) + randn(3, 40, seed=3, dtype=torch.float64)
    xs = list(_rows(scale=30.0)) + [("rising logits 3×40 float64", ramp)]
    _softmax_check(m.online_softmax, "online_softmax(x) vs flashcourse.safe_softmax", xs, blocks=(4, 16))


@CHECKS.add("online_softmax", "one pass over blocks: no max or sum over a whole row",
            hint="reduce one block x[..., start:start + block] at a time and merge it into the running (m, l)")
def _(m):
    x = randn(3, 100, seed=11)
    reductions = {"amax", "max", "sum", "logsumexp", "softmax", "log_softmax", "_softmax"}
    whole_row = lambda name, args, out: (name in reductions and bool(args) and isinstance(args[0], torch.Tensor)  # noqa: E731
                                         and args[0].shape[-1] == x.shape[-1])
    with Watch(whole_row) as watch:
        m.online_softmax(x, block=16)
    expect(watch.culprit is None, f"online_softmax(x, block=16) reduced a whole row of {x.shape[-1]} with "
                                  f"torch.{watch.culprit}: gather (m, l) block by block instead")


@CHECKS.add("online_softmax", "masked entries, a row of all −inf", hint="while m is still −inf, subtract 0 instead of m (no NaN)")
def _(m):
    _softmax_check(m.online_softmax, "online_softmax(x) vs flashcourse.safe_softmax", [("4×23 with −inf", _masked_rows())],
                   blocks=(3, 8))


def _states(n, d, cut, seed, scale=10.0):
    """The states (with values when d) of s[:, :cut] and s[:, cut:] and of the whole row, for 3 rows."""
    s = randn(3, n, seed=seed, dtype=torch.float64, scale=scale)
    v = randn(n, d, seed=seed + 1, dtype=torch.float64) if d else None
    part = lambda lo, hi: block_state(s[:, lo:hi], None if v is None else v[lo:hi])  # noqa: E731
    return part(0, cut), part(cut, n), part(0, n)


def _expect_state(got, want, case):
    expect(isinstance(got, tuple) and len(got) == 3,
           f"merge_states must return SoftmaxState(m, l, o), got {type(got).__name__} [{case}]")
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
        _expect_state(m.merge_states(a, b), fc.merge_states(a, b), case)
        _expect_state(m.merge_states(b, a), whole, case + ", merged b with a")


@CHECKS.add("merge_states", "o rescaled with l", points=2, hint="o = α o_a + β o_b with α = exp(m_a − m)[..., None]")
def _(m):
    for n, d, cut, seed in [(10, 4, 4, 3), (47, 8, 30, 4)]:
        a, b, whole = _states(n, d, cut, seed)
        case = f"3 rows, d={d}, slices [0:{cut}] and [{cut}:{n}]"
        _expect_state(m.merge_states(a, b), fc.merge_states(a, b), case)
        got = m.merge_states(a, b)
        O, _ = finalize(whole)
        expect_close("o / l of merge_states(a, b) vs softmax(s) v", got[2] / got[1][..., None], O, atol=1e-9, case=case)


@CHECKS.add("merge_states", "with empty states (m = −inf)", hint="where m is −inf, subtract 0 instead: exp(−inf − (−inf)) is NaN")
def _(m):
    a, _, _ = _states(12, 4, 12, 5)
    empty = empty_state((3,), d=4, dtype=torch.float64)
    _expect_state(m.merge_states(empty, a), a, "empty with a state")
    _expect_state(m.merge_states(empty, empty), empty, "empty with empty")
