"""Safe softmax, online softmax and the merge of partial states (chapter 02), property-based where it helps.

Every test runs on the ``device`` fixture (session-scoped, so that hypothesis may use it).
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcourse import SoftmaxState, merge_states, online_softmax, safe_softmax
from flashcourse.softmax import block_state, empty_state, finalize

rows = st.integers(1, 4)
lengths = st.integers(1, 70)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([1.0, 30.0, 1000.0])


def randn(*shape, seed, scale=1.0, device="cpu"):
    """float64 normal numbers drawn on the CPU (the same on every device), then moved to ``device``."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(device)


@settings(max_examples=60, deadline=None)
@given(r=rows, n=lengths, block=st.integers(1, 80), seed=seeds, scale=scales)
def test_online_softmax_equals_softmax(r, n, block, seed, scale, device):
    x = randn(r, n, seed=seed, scale=scale, device=device)
    assert torch.allclose(online_softmax(x, block=block), torch.softmax(x, dim=-1), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=lengths, cuts=st.lists(st.integers(0, 70), min_size=2, max_size=2), seed=seeds, scale=scales)
def test_merge_is_associative_and_exact(n, cuts, seed, scale, device):
    s, v = randn(3, n, seed=seed, scale=scale, device=device), randn(n, 5, seed=seed + 1, device=device)
    a, b = sorted(min(c, n) for c in cuts)
    A, B, C = (block_state(s[:, x:y], v[x:y]) for x, y in ((0, a), (a, b), (b, n)))
    left, right = merge_states(merge_states(A, B), C), merge_states(A, merge_states(B, C))
    for x, y in zip(left, right):
        assert torch.allclose(x, y, atol=1e-12)
    O, L = finalize(left)
    assert torch.allclose(O, torch.softmax(s, -1) @ v, atol=1e-12)
    assert torch.allclose(L, torch.logsumexp(s, -1), atol=1e-12)


def test_merge_is_commutative_and_empty_is_identity(device):
    s, v = randn(2, 9, seed=1, device=device), randn(9, 3, seed=2, device=device)
    A, B = block_state(s[:, :4], v[:4]), block_state(s[:, 4:], v[4:])
    for x, y in zip(merge_states(A, B), merge_states(B, A)):
        assert torch.allclose(x, y)
    E = empty_state((2,), d=3, dtype=torch.float64, device=device)
    for x, y in zip(merge_states(E, A), A):
        assert torch.equal(x, y)


def test_states_without_values(device):
    s = randn(2, 9, seed=3, device=device)
    state = merge_states(block_state(s[:, :5]), block_state(s[:, 5:]))
    assert state.o is None and isinstance(state, SoftmaxState)
    assert torch.allclose(finalize(state)[1], torch.logsumexp(s, -1))


def test_fully_masked_rows_give_zeros_not_nan(device):
    x = torch.full((2, 6), float("-inf"), dtype=torch.float64, device=device)
    x[1, 2] = 0.5
    for p in (safe_softmax(x), online_softmax(x, block=4)):
        assert not torch.isnan(p).any() and (p[0] == 0).all() and p[1, 2] == 1
    v = torch.ones(6, 1, dtype=torch.float64, device=device)
    O, L = finalize(merge_states(block_state(x[:, :3], v[:3]), block_state(x[:, 3:], v[3:])))
    assert (O[0] == 0).all() and torch.isneginf(L[0]) and not torch.isnan(O).any()


def test_other_dims_and_fp16_overflow(device):
    x = randn(4, 5, 6, seed=4, scale=20, device=device)
    for dim in (0, 1, 2):
        assert torch.allclose(safe_softmax(x, dim=dim), torch.softmax(x, dim=dim))
        assert torch.allclose(online_softmax(x, dim=dim, block=2), torch.softmax(x, dim=dim))
    h = torch.tensor([[12.0, 11.0, 10.0]], dtype=torch.float16, device=device)
    naive = torch.exp(h) / torch.exp(h).sum()  # exp(12) > 65504: overflows fp16
    assert torch.isnan(naive).any() or torch.isinf(torch.exp(h)).any()
    assert torch.isfinite(safe_softmax(h)).all()


def test_inf_or_nan_entries_give_nan_rows_as_torch_softmax(device):
    x = randn(4, 10, seed=5, device=device)
    x[0, 3], x[1, 7] = float("inf"), float("nan")
    want = torch.softmax(x, dim=-1)
    for p in (safe_softmax(x), online_softmax(x, block=4)):
        assert torch.equal(torch.isnan(p), torch.isnan(want)) and torch.isnan(p[:2]).all()
        assert torch.allclose(p[2:], want[2:], atol=1e-12)
    v = randn(10, 3, seed=6, device=device)
    O, L = finalize(merge_states(block_state(x[:, :5], v[:5]), block_state(x[:, 5:], v[5:])))
    assert torch.isnan(O[:2]).all() and torch.isfinite(O[2:]).all() and not torch.isfinite(L[:2]).any()
