"""flash-attn's score options in the kernels: windows, soft-capping, ALiBi, dropout; forward and backward.

Each option alone, then a pairwise subset of option × causal × grouped heads × Nq vs Nk × ragged
lengths × head dim × dtype, at small sizes (d <= 32, N <= 70) so that the CPU interpreter runs them in
CI; the full product, at real sizes, is GPU-only (test_gpu_options.py). The oracle is
``flash_reference.reference_attention`` in float64, and the accuracy rule is flash-attn's: the kernel's
largest error is at most twice that of the same reference computed in the inputs' precision, plus a
small atol. Dropout is checked with the mask that ``return_attn_probs`` reports (regenerated, not
stored, by the backward): determinism, keep rate, and gradients against the reference with that mask.
"""

import itertools

import pytest
import torch
import triton
import triton.language as tl

from flashcourse import flash_attention
from flashcourse.kernels.configs import KernelConfig
from flashcourse.kernels.scores import key_range, query_range, score_args
from flash_reference import max_error, reference_attention, visible
from helpers import make_qkv

ATOL = 1e-5

# name -> flash_attention keyword arguments; "H" / "BH" stand for ALiBi slopes of shape (H,) / (B, H)
OPTIONS = {
    "window-left": dict(window_size=(9, -1)),
    "window-right": dict(window_size=(-1, 5)),
    "window-both": dict(window_size=(6, 2)),
    "window-0-0": dict(window_size=(0, 0)),
    "softcap": dict(softcap=1.5),
    "alibi-H": dict(alibi_slopes="H"),
    "alibi-BH": dict(alibi_slopes="BH"),
    "dropout": dict(dropout_p=0.25),
}
# (equal / q<k / q>k) × (multiples of the interpreter's blocks / ragged)
LENGTHS = {("equal", "aligned"): (64, 64), ("equal", "ragged"): (45, 45), ("q<k", "aligned"): (32, 64),
           ("q<k", "ragged"): (17, 70), ("q>k", "aligned"): (64, 32), ("q>k", "ragged"): (70, 23)}
HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (2, 1)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _slopes(spec, B, H, device):
    g = torch.Generator().manual_seed(7)
    shape = (H,) if spec == "H" else (B, H)
    return (torch.rand(shape, generator=g) * 0.3 + 0.05).to(device)


def check_accuracy(device, dtype, B, H, Hkv, Nq, Nk, d, seed=0, **options):
    """Forward and backward against float64, with flash-attn's rule (2x the low-precision reference's error)."""
    if isinstance(options.get("alibi_slopes"), str):
        options["alibi_slopes"] = _slopes(options["alibi_slopes"], B, H, device)
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, d, dtype=dtype, seed=seed, device=device)
    do = torch.randn(B, H, Nq, d, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, _, probs = flash_attention(*leaves, return_attn_probs=True, **options)
    assert not o.isnan().any()
    got = (o, *torch.autograd.grad(o, leaves, do))
    # the dropout mask the kernels drew: P̃ is negated (sign bit set, even for 0) where a weight was dropped
    keep = ~torch.signbit(probs) if options.get("dropout_p", 0) > 0 else None
    refs = {}
    for ref_dtype in (torch.float64, dtype):
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_o = reference_attention(*ref_leaves, keep=keep, dtype=ref_dtype, **options)
        refs[ref_dtype] = (ref_o, *torch.autograd.grad(ref_o, ref_leaves, do.to(ref_dtype)))
    for name, g, want, low in zip(("O", "dq", "dk", "dv"), got, refs[torch.float64], refs[dtype]):
        assert g.shape == want.shape and g.dtype == dtype, name
        err, low_err = max_error(g, want), max_error(low, want)
        assert err <= 2 * low_err + ATOL, f"{name}: error {err:.2e}, the {dtype} reference's {low_err:.2e}"


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_alone(option, device):
    check_accuracy(device, torch.float16, B=2, H=2, Hkv=1, Nq=37, Nk=53, d=16, **OPTIONS[option])


def test_all_options_together(device):
    options = dict(causal=True, window_size=(20, 0), softcap=2.0, alibi_slopes="BH", dropout_p=0.2)
    check_accuracy(device, torch.bfloat16, B=2, H=2, Hkv=1, Nq=45, Nk=61, d=32, **options)


def pairwise(factors: dict) -> list[dict]:
    """A few combinations in which every pair of values of two factors occurs at least once (greedy)."""
    names = list(factors)

    def pairs(row):
        return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2) if a in row and b in row}

    uncovered = {(a, x, b, y) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]}
    rows = []
    while uncovered:
        a, x, b, y = min(uncovered, key=lambda p: (names.index(p[0]), names.index(p[2]), factors[p[0]].index(p[1]),
                                                     factors[p[2]].index(p[3])))
        row = {a: x, b: y}
        for n in names:
            if n not in row:  # the value that covers the most new pairs with the values chosen so far
                row[n] = max(factors[n], key=lambda val: len(pairs({**row, n: val}) & uncovered))
        row = {n: row[n] for n in names}
        uncovered -= pairs(row)
        rows.append(row)
    return rows


PAIRWISE = pairwise({
    "option": list(OPTIONS), "causal": [False, True], "heads": list(HEADS), "shape": ["equal", "q<k", "q>k"],
    "lengths": ["aligned", "ragged"], "d": [16, 24, 32], "dtype": list(DTYPES),
})


def test_pairwise_subset_covers_every_pair():
    for a, b in itertools.combinations(PAIRWISE[0], 2):
        assert {(row[a], row[b]) for row in PAIRWISE} >= set(itertools.product(
            {row[a] for row in PAIRWISE}, {row[b] for row in PAIRWISE}))
    assert len(PAIRWISE) <= 30


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_options_pairwise(case, device):
    H, Hkv = HEADS[case["heads"]]
    Nq, Nk = LENGTHS[(case["shape"], case["lengths"])]
    check_accuracy(device, DTYPES[case["dtype"]], 1, H, Hkv, Nq, Nk, case["d"], seed=Nq + Nk + case["d"],
                   causal=case["causal"], **OPTIONS[case["option"]])


# ---------------------------------------------------------------------------------------------
# Windows: the block ranges, and blocks outside the window are never read


@triton.jit
def _ranges_kernel(OUT, STARTS, offset, left, right, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   LEFT_LIMIT: tl.constexpr, RIGHT_LIMIT: tl.constexpr):
    start = tl.load(STARTS + tl.program_id(0))
    if tl.program_id(1) == 0:
        lo, mid_lo, mid_hi, hi = key_range(start, Nk, offset, left, right, BLOCK_M, BLOCK_N, LEFT_LIMIT, RIGHT_LIMIT)
    else:
        lo, mid_lo, mid_hi, hi = query_range(start, Nq, offset, left, right, BLOCK_M, BLOCK_N, LEFT_LIMIT, RIGHT_LIMIT)
    out = OUT + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 4
    tl.store(out, lo)
    tl.store(out + 1, mid_lo)
    tl.store(out + 2, mid_hi)
    tl.store(out + 3, hi)


def _sees(rows, cols, offset, window):
    """(len(rows), len(cols)) bool: query i sees key j inside the window (no bound on the lengths)."""
    left, right = window
    i, j = torch.tensor(rows)[:, None] + offset, torch.tensor(cols)[None, :]
    return ((j <= i + right) | (right < 0)) & ((j >= i - left) | (left < 0))


@pytest.mark.parametrize("Nq, Nk", [(40, 40), (17, 70), (70, 23)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (5, -1), (-1, 3), (6, 2), (0, 0), (20, 40)])
def test_block_ranges_against_brute_force(Nq, Nk, window, device):
    """key_range and query_range for every block of B_r = 16 query rows and of B_c = 8 keys: [lo, hi)
    holds every visible pair (the blocks outside are never loaded), no visited block is wholly hidden,
    and [mid_lo, mid_hi) is whole blocks that every row sees in full (run without a mask)."""
    BM, BN = 16, 8
    left, right = window
    offset = Nk - Nq
    for side, (size, step, other) in enumerate(((Nq, BM, Nk), (Nk, BN, Nq))):
        starts = list(range(0, size, step))
        out = torch.empty(2 * len(starts) * 4, dtype=torch.int32, device=device)
        _ranges_kernel[(len(starts), 2)](out, torch.tensor(starts, dtype=torch.int32, device=device), offset, left,
                                         right, Nq, Nk, BM, BN, left >= 0, right >= 0)
        for start, (lo, mid_lo, mid_hi, hi) in zip(starts, out.view(2, len(starts), 4)[side].tolist()):
            assert 0 <= lo <= mid_lo <= mid_hi <= hi <= other
            if side == 0:  # query rows start .. start + B_r − 1 (past Nq too: the tile has them) visit key blocks
                sees = _sees(range(start, start + BM), range(Nk), offset, window)
                block = lambda a: sees[:, a:a + BN]  # noqa: E731
                full = sees[:, mid_lo:mid_hi]
                assert mid_lo == mid_hi or (mid_hi <= Nk // BN * BN and (mid_hi - mid_lo) % BN == 0)
            else:  # keys start .. start + B_c − 1 are visited by query blocks
                sees = _sees(range(Nq), range(start, start + BN), offset, window).T
                block = lambda a: sees[:, a:a + BM]  # noqa: E731
                full = sees[:, mid_lo:mid_hi]
                assert (mid_hi - mid_lo) % BM == 0 or mid_hi == Nq
            seen = sees.any(0).nonzero().flatten()
            assert seen.numel() == 0 or (lo <= seen.min() and seen.max() < hi), (start, seen.tolist(), lo, hi)
            assert all(block(a).any() for a in range(lo, hi, BN if side == 0 else BM)), (start, lo, hi)
            assert full.all(), (start, mid_lo, mid_hi)


def test_blocks_outside_the_window_are_never_read(device, monkeypatch):
    """16 query rows see keys i + 60 .. i + 68 (window (4, 4), Nk − Nq = 64), so with blocks of 16 keys
    the blocks of keys 0..47 are wholly outside. Poisoned with NaN they leave O, dq, dk, dv finite, and
    dk = dv = 0 there: neither the forward nor the dK/dV or dQ kernel loaded them (a masked load of
    NaN would still give NaN through the products)."""
    for kernel in ("FORWARD", "DKDV", "DQ"):
        monkeypatch.setenv(f"FLASHCOURSE_CONFIG_{kernel}", "16,16,4,1")
    q, k, v = make_qkv(1, 2, 2, 16, 80, 16, dtype=torch.float32, seed=4, device=device)
    k[:, :, :48] = float("nan")
    v[:, :, :48] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, window_size=(4, 4))
    dq, dk, dv = torch.autograd.grad(o.sum(), leaves)
    assert o.isfinite().all() and dq.isfinite().all() and dk.isfinite().all() and dv.isfinite().all()
    assert (dk[:, :, :48] == 0).all() and (dv[:, :, :48] == 0).all()
    # the same attention on the clean keys 48..79 alone (Nk − Nq = 16, the window is the same)
    assert max_error(o, reference_attention(q, k[:, :, 48:], v[:, :, 48:], window_size=(4, 4))) < 1e-5


def test_options_that_hide_nothing_compile_the_plain_kernel():
    """A window wider than the sequences adds no mask, and no option is a compile-time flag left on."""
    q = torch.empty(1, 1, 1, 1)
    _, flags = score_args(q, 30, 50, scale=0.1, causal=False, window_size=(50, 29))
    assert not any(flags.values())
    _, flags = score_args(q, 1, 50, scale=0.1, causal=True)  # one query sees every key: causal is plain
    assert not any(flags.values())
    _, flags = score_args(q, 30, 50, scale=0.1, causal=True, window_size=(49, 5))
    assert flags == dict(LEFT_LIMIT=True, RIGHT_LIMIT=True, SOFTCAP=False, ALIBI=False, DROPOUT=False)


# ---------------------------------------------------------------------------------------------
# Dropout


def _dropout_call(device, seed, p=0.3, B=2, N=64, **options):
    q, k, v = make_qkv(B, 2, 1, N, N, 16, dtype=torch.float16, seed=1, device=device)
    torch.manual_seed(seed)
    return flash_attention(q, k, v, dropout_p=p, return_attn_probs=True, **options)


def test_dropout_is_repeatable_with_torch_manual_seed(device):
    o1, _, p1 = _dropout_call(device, seed=0, B=1, N=32)
    o2, _, p2 = _dropout_call(device, seed=0, B=1, N=32)
    o3, _, p3 = _dropout_call(device, seed=1, B=1, N=32)
    assert torch.equal(o1, o2) and torch.equal(torch.signbit(p1), torch.signbit(p2))
    assert not torch.equal(torch.signbit(p1), torch.signbit(p3))


def test_dropout_keep_rate_and_independence(device):
    """Over 2 · 2 · 64 · 64 weights the dropped fraction is p within 5 standard deviations, and the
    masks of two heads or two batches differ (one Philox number per (batch, head, i, j))."""
    p = 0.3
    _, _, probs = _dropout_call(device, seed=3, p=p)
    dropped = torch.signbit(probs)
    n = dropped.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert (dropped[0, 0] != dropped[0, 1]).float().mean() > 0.3
    assert (dropped[0, 0] != dropped[1, 0]).float().mean() > 0.3


def test_dropout_probabilities_are_the_softmax(device):
    """|P̃| normalised by its row sum is softmax(s) of the float64 reference, in every visible entry."""
    _, lse, probs = _dropout_call(device, seed=5, causal=True, window_size=(10, 0))
    q, k, v = make_qkv(2, 2, 1, 64, 64, 16, dtype=torch.float16, seed=1, device=device)
    P = probs.abs().double()
    P = P / P.sum(-1, keepdim=True)
    s = (q.double() @ k.double().transpose(-2, -1)) / 4
    s = s.masked_fill(~visible(64, 64, causal=True, window_size=(10, 0), device=device), float("-inf"))
    assert max_error(P, torch.softmax(s, -1)) < 2e-3
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-3)


def test_dropout_gradients_use_the_regenerated_mask(device):
    """The backward regenerates the forward's mask from its (seed, offset): the gradients are those of
    the reference with the mask the forward reported (checked the same way for every case above), and
    not those of another mask with the same keep rate."""
    check_accuracy(device, torch.float32, B=1, H=2, Hkv=1, Nq=30, Nk=50, d=16, dropout_p=0.4, causal=True)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 30, 50, 16, dtype=torch.float32, device=device))
    torch.manual_seed(0)
    o, _, probs = flash_attention(q, k, v, causal=True, dropout_p=0.4, return_attn_probs=True)
    dq = torch.autograd.grad(o.sum(), q)[0]
    other = (~torch.signbit(probs)).roll(1, dims=-1)  # the same rate, another pattern
    q64 = q.detach().double().requires_grad_()
    o_other = reference_attention(q64, k.detach(), v.detach(), causal=True, dropout_p=0.4, keep=other)
    assert max_error(dq, torch.autograd.grad(o_other.sum(), q64)[0]) > 0.1


def test_a_row_that_sees_no_key(device):
    """Nq > Nk causal with a left window: rows with no visible key give O = 0, L = −inf, dq = 0."""
    q, k, v = make_qkv(1, 2, 1, 40, 17, 16, dtype=torch.float32, seed=2, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = flash_attention(*leaves, causal=True, window_size=(3, -1), return_lse=True, softcap=5.0)
    dq, _, _ = torch.autograd.grad(o.sum(), leaves)
    empty = ~visible(40, 17, causal=True, window_size=(3, -1), device=device).any(-1)
    assert empty[:23].all() and not empty[23:].any()
    assert (o[:, :, empty] == 0).all() and (lse[:, :, empty] == float("-inf")).all()
    assert (dq[:, :, empty] == 0).all() and dq.isfinite().all()


def test_pinned_configurations_give_the_same_result(device):
    """Other block shapes cross the window's edges elsewhere: the same O (to rounding)."""
    from flashcourse.kernels.forward import attention_forward

    q, k, v = make_qkv(1, 2, 1, 70, 45, 32, dtype=torch.float32, seed=9, device=device)
    opts = dict(causal=False, scale=0.2, window_size=(7, 11), softcap=3.0, alibi_slopes=_slopes("H", 1, 2, device))
    base = attention_forward(q, k, v, config=KernelConfig(16, 16), **opts)[0]
    for config in (KernelConfig(64, 16), KernelConfig(16, 64), KernelConfig(32, 32, 4, 2, False)):
        assert max_error(attention_forward(q, k, v, config=config, **opts)[0], base) < 1e-5
