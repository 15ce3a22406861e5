"""Chapter 11: the ring step that folds a partial (O, L) in, and the zigzag index map, against
flashcourse.naive_attention in float64 and flashcourse.distributed.

The ring runs with simulated ranks in the worker: the grader computes, from its float64 oracle, the
partial (O_b, L_b) of every block that each rank computes at each step of ``ring_schedule``, and the
``ring`` driver folds them, rank by rank and step by step, with the learner's ``fold`` (no process,
no communication). The rows of all ranks, put back in sequence order, must be attention over the
whole sequence.
"""

import torch

from flashcourse.distributed import fold, ring_schedule, shard, unshard

from ..framework import ChapterChecks, case_name, expect, expect_close, expect_tensor, qkv, tolerance
from ._common import oracle

CHECKS = ChapterChecks("ch11", file="ch11_ring", notebook="11_beyond_one_gpu")
FOLD_HINT = ("m = max(L, L_b), α = e^(L − m), β = e^(L_b − m); O_new = (α O + β O_b) / (α + β), "
             "L_new = m + log(α + β)")


def _state(q, k, v, causal=False):
    """(O, L) in float32 of q against the keys k, v: what a kernel gives a rank."""
    O, L = oracle(q, k, v, causal)
    return O.float(), L.float()


def _expect_fold(got, want, case: str) -> None:
    expect(isinstance(got, tuple) and len(got) == 2, f"fold must return (O_new, L_new), got {type(got).__name__} [{case}]",
           "return O_new, L_new")
    tol = tolerance(torch.float32)
    expect_close("O_new vs attention over both key sets", got[0], want[0], case=case, dtype=torch.float32,
                 dtype_hint="return O_new in float32 (compute in float32 whatever the dtype of O and O_b)", **tol)
    expect_close("L_new vs the logsumexp over both key sets", got[1], want[1], case=case, dtype=torch.float32,
                 dtype_hint="return L_new in float32", **tol)


def _halves(m, shapes, dtype=torch.float32):
    """fold of the states of two disjoint key sets vs the state of both: attention over the whole, or (O in
    a low precision) flashcourse.distributed.fold of the rounded states."""
    for n, (B, H, Nq, Nk, d, cut) in enumerate(shapes):
        q, k, v = qkv(B, H, Nq, Nk, d, seed=40 + 3 * n, scale=2.0)
        first, second = _state(q, k[:, :, :cut], v[:, :, :cut]), _state(q, k[:, :, cut:], v[:, :, cut:])
        case = case_name(B=B, H=H, r=Nq, d=d, dtype=dtype) + f" keys [0:{cut}] and [{cut}:{Nk}]"
        O1, O2 = first[0].to(dtype), second[0].to(dtype)
        whole = _state(q, k, v) if dtype == torch.float32 else fold(O1, first[1], O2, second[1])
        _expect_fold(m.fold(O1, first[1], O2, second[1]), whole, case)
        _expect_fold(m.fold(O2, second[1], O1, first[1]), whole, case + ", the other way round")


@CHECKS.add("fold", "two disjoint key sets, either way round", points=2, hint=FOLD_HINT)
def _(m):
    _halves(m, [(1, 2, 7, 20, 16, 8), (2, 1, 1, 9, 8, 1), (1, 1, 13, 64, 32, 40)])


@CHECKS.add("fold", "rows that saw no key yet (L = −inf), and far-apart L",
            hint="where m = max(L, L_b) is −inf subtract 0 instead; where α + β = 0 return O = 0, L = −inf")
def _(m):
    q, k, v = qkv(1, 2, 6, 10, 8, seed=51)
    O, L = _state(q, k, v)
    empty = (torch.zeros_like(O), torch.full_like(L, float("-inf")))
    _expect_fold(m.fold(*empty, O, L), (O, L), "a state folded into an empty one")
    _expect_fold(m.fold(O, L, *empty), (O, L), "an empty state folded into a state")
    _expect_fold(m.fold(*empty, *empty), empty, "two empty states")
    # L 120 apart: e^(L − L_b) overflows float32 unless measured from the max
    far = (O.flip(-1), L + 120.0)
    _expect_fold(m.fold(O, L, *far), far, "L_b = L + 120")


@CHECKS.add("fold", "partial outputs in float16 (and bfloat16), as a kernel returns them",
            hint="upcast O and O_b with .float() before the sums; return O_new and L_new in float32")
def _(m):
    for dtype in (torch.float16, torch.bfloat16):
        _halves(m, [(1, 2, 7, 20, 16, 8)], dtype=dtype)


@CHECKS.driver
def ring(module, shape, partials):
    """Worker side: each rank's running (O, L), from O = 0, L = −inf, folded with the learner's fold at
    every ring step. partials[r][s] = [(r0, r1, O_b, L_b), ...]: the blocks of rank r at step s, covering
    rows r0:r1 of its shard. Returns [(O, L)] per rank."""
    out = []
    for steps in partials:
        O = torch.zeros(shape)
        L = torch.full(shape[:3], float("-inf"))
        for blocks in steps:
            for r0, r1, O_b, L_b in blocks:
                O[:, :, r0:r1], L[:, :, r0:r1] = module.fold(O[:, :, r0:r1], L[:, :, r0:r1], O_b, L_b)
        out.append((O, L))
    return out


def _ring_case(m, P: int, layout: str, causal: bool, N: int, B=1, H=2, d=16, seed=60) -> None:
    q, k, v = qkv(B, H, N, N, d, seed=seed)
    shards = [[shard(t, r, P, layout) for r in range(P)] for t in (q, k, v)]
    c = N // (2 * P if layout == "zigzag" else P)  # the chunk length
    partials = []
    for r in range(P):
        steps = []
        for s, blocks in enumerate(ring_schedule(r, P, layout, causal)):
            src = (r - s) % P  # rank r holds rank src's keys at step s
            steps.append([(b.rows(c).start, b.rows(c).stop,
                           *_state(shards[0][r][:, :, b.rows(c)], shards[1][src][:, :, b.cols(c)],
                                   shards[2][src][:, :, b.cols(c)], b.causal)) for b in blocks])
        partials.append(steps)
    case = case_name(P=P, layout=layout, N=N, B=B, H=H, d=d, causal=causal)
    got = m.run("ring", [B, H, N // P, d], partials)
    expect(isinstance(got, list) and len(got) == P and all(isinstance(x, tuple) and len(x) == 2 for x in got),
           f"the ring could not be run with your fold [{case}]")
    for r, (O_r, L_r) in enumerate(got):
        expect_tensor(f"O of rank {r}", O_r, (B, H, N // P, d), case=case)
        expect_tensor(f"L of rank {r}", L_r, (B, H, N // P), case=case)
    O, L = unshard([o for o, _ in got], layout), unshard([l[..., None] for _, l in got], layout)[..., 0]
    want_O, want_L = _state(q, k, v, causal)
    tol = tolerance(torch.float32)
    expect_close("O of the ring (all ranks, in sequence order) vs attention over the whole sequence", O, want_O,
                 case=case, **tol)
    expect_close("L of the ring vs the logsumexp over the whole sequence", L, want_L, case=case, **tol)


@CHECKS.add("fold", "a simulated ring: P = 2 and 4 ranks, both layouts, causal and not", points=3,
            hint="each step folds the visiting block's (O_b, L_b) into the rows it covers; fold must be exact in "
                 "any order: the ranks fold their partials in different orders")
def _(m):
    for P, N in ((2, 12), (4, 24)):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                _ring_case(m, P, layout, causal, N)


def _positions_check(m, layout: str, cases) -> None:
    from flashcourse.distributed import shard_positions

    for N, P in cases:
        for r in range(P):
            want = shard_positions(N, r, P, layout)
            expect_close(f"shard_positions(N, rank, P, {layout!r}) vs flashcourse.distributed.shard_positions",
                         m.shard_positions(N, r, P, layout), want, atol=0, case=f"N={N} rank={r} P={P}",
                         dtype=torch.int64, dtype_hint="return int64 positions: torch.arange gives them")


@CHECKS.add("shard_positions", "contiguous: the r-th of P chunks", hint="[r·N/P, (r+1)·N/P): torch.arange(r * n, (r + 1) * n)")
def _(m):
    _positions_check(m, "contiguous", [(8, 2), (12, 4), (5, 1)])


@CHECKS.add("shard_positions", "zigzag: chunks r and 2P − 1 − r", points=2,
            hint="c = N / 2P; rank r holds [r·c, (r+1)·c) and then [(2P−1−r)·c, (2P−r)·c)")
def _(m):
    _positions_check(m, "zigzag", [(8, 2), (24, 4), (12, 3), (2, 1)])


@CHECKS.driver
def raises(module, N, rank, world_size, layout):
    """Worker side: the name of the exception the learner's shard_positions raises, or 'nothing'."""
    try:
        module.shard_positions(N, rank, world_size, layout)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001  (which one is the question)
        return type(e).__name__
    return "nothing"


@CHECKS.add("shard_positions", "a length the layout cannot cut, a layout that does not exist: ValueError",
            hint="zigzag needs N divisible by 2P, contiguous by P: raise ValueError(...) otherwise, and for a layout "
                 "other than 'contiguous' and 'zigzag'")
def _(m):
    for N, P, layout in ((10, 3, "zigzag"), (12, 4, "zigzag"), (7, 2, "contiguous"), (8, 2, "striped")):
        got = m.run("raises", N, 0, P, layout)
        expect(got == "ValueError", f"shard_positions({N}, 0, {P}, {layout!r}) raised {got}, expected ValueError")
