"""Softmax three ways: safe (subtract the max), online (one streaming pass), and merged partial states.

A partial state summarises a slice of a score row s (and, for attention, of the value rows v):

    m = max_j s_j          l = Σ_j exp(s_j − m)          o = Σ_j exp(s_j − m) v_j

Two states of disjoint slices merge into the state of their union (associatively), which is what
online softmax, tiled attention and split-KV decoding are built from. The final results are
softmax weights exp(s − m) / l, the attention output O = o / l and the logsumexp L = m + log l.

A slice with no visible entry (all −inf) has l = 0 and gives zeros, not NaN; a +inf or NaN entry
gives NaN in its row, as ``torch.softmax`` does.
"""

from typing import NamedTuple, Optional

import torch

from ._checks import check_float_tensor
from ._env import factory_device


class SoftmaxState(NamedTuple):
    """m (..., r) running max, l (..., r) running sum of exp(s − m), o (..., r, d) or None: Σ exp(s − m) v."""

    m: torch.Tensor
    l: torch.Tensor
    o: Optional[torch.Tensor] = None


def shifted_exp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(x − m) with m broadcast over the last dim of x; a row whose max is −inf gives 0, not NaN."""
    return torch.exp(x - torch.where(torch.isneginf(m), 0.0, m)[..., None])


def safe_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x) computed as exp(x − max x) / Σ exp(x − max x), so exp never overflows.

    x: a floating-point tensor of any shape. A row that is entirely −inf (a query that sees no key)
    gives zeros instead of NaN.
    """
    check_float_tensor("x", x, "(..., n)")
    x = x.movedim(dim, -1)
    # m = max_j x_j
    m = x.amax(dim=-1)
    # e_j = exp(x_j − m)  ≤ 1
    e = shifted_exp(x, m)
    # l = Σ_j e_j
    l = e.sum(dim=-1, keepdim=True)
    return torch.where(l == 0, 0.0, e / l).movedim(-1, dim)


def block_state(s: torch.Tensor, v: Optional[torch.Tensor] = None) -> SoftmaxState:
    """The state of one block of scores s (..., r, n) and optionally its values v (..., n, d).

    m and l are (..., r); o = exp(s − m) v is (..., r, d), as in attention (r query rows, n keys).
    """
    if s.shape[-1] == 0:
        return empty_state(s.shape[:-1], d=None if v is None else v.shape[-1], dtype=s.dtype, device=s.device)
    # m = max_j s_j
    m = s.amax(dim=-1)
    # p_j = exp(s_j − m)
    p = shifted_exp(s, m)
    # l = Σ_j p_j,   o = Σ_j p_j v_j
    return SoftmaxState(m, p.sum(dim=-1), None if v is None else p.to(v.dtype) @ v)


def merge_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state of the union of two disjoint slices; associative and commutative."""
    # m = max(m_a, m_b)
    m = torch.maximum(a.m, b.m)
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    # α = exp(m_a − m),  β = exp(m_b − m): rescale each sum to the common max
    alpha, beta = torch.exp(a.m - m_safe), torch.exp(b.m - m_safe)
    # l = α l_a + β l_b
    l = alpha * a.l + beta * b.l
    if a.o is None or b.o is None:
        return SoftmaxState(m, l)
    # o = α o_a + β o_b
    return SoftmaxState(m, l, alpha[..., None] * a.o + beta[..., None] * b.o)


def empty_state(shape, d: Optional[int] = None, dtype=torch.float32, device=None) -> SoftmaxState:
    """The state of an empty slice (the identity of merge): m = −inf, l = 0, o = 0."""
    device = factory_device(device)
    m = torch.full(shape, float("-inf"), dtype=dtype, device=device)
    l = torch.zeros(shape, dtype=dtype, device=device)
    o = None if d is None else torch.zeros(*shape, d, dtype=dtype, device=device)
    return SoftmaxState(m, l, o)


def finalize(state: SoftmaxState):
    """(O, L): O = o / l (0 where l = 0) and the logsumexp L = m + log l (−inf where l = 0)."""
    L = torch.where(state.l == 0, float("-inf"), state.m + torch.log(state.l))
    if state.o is None:
        return None, L
    O = torch.where(state.l[..., None] == 0, 0.0, state.o / state.l[..., None])
    return O, L


def online_softmax(x: torch.Tensor, dim: int = -1, block: int = 64) -> torch.Tensor:
    """softmax(x) with the statistics (m, l) gathered in ONE streaming pass over blocks of ``block``.

    Each block is merged into the running state (m, l) as it arrives, so the full row is never needed
    at once; a second pass writes exp(x − m) / l. Same contract as ``safe_softmax``.
    """
    check_float_tensor("x", x, "(..., n)")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (elements per block), got {block!r}")
    x = x.movedim(dim, -1)
    state = empty_state(x.shape[:-1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[-1], block):
        state = merge_states(state, block_state(x[..., start : start + block]))
    p = shifted_exp(x, state.m)
    return torch.where(state.l[..., None] == 0, 0.0, p / state.l[..., None]).movedim(-1, dim)
