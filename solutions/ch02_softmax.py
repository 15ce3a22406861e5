"""Chapter 02: softmax without overflow, in one streaming pass, and from merged partial states.

Every function works on the last dimension of x (..., N). Run `flashcourse grade ch02` to check.
"""

import torch

from flashcourse.softmax import SoftmaxState  # given: the NamedTuple (m, l, o)


def safe_softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, computed as exp(x − m) / Σ exp(x − m) with m = max x.

    x: (..., N) -> (..., N), same dtype. Subtracting the row max m keeps every exponent <= 0, so exp
    never overflows, even for logits of 1000. A row that is all −inf (a query that sees no key)
    must give zeros, not NaN.

    Hints:
      1. m = x.amax(dim=-1, keepdim=True); e = torch.exp(x − m); divide by e.sum(dim=-1, keepdim=True).
      2. For an all −inf row, m = −inf and x − m = −inf − (−inf) = NaN: subtract 0 instead on those rows
         (torch.where(torch.isneginf(m), 0.0, m)).
      3. Then that row has l = 0: return torch.where(l > 0, e / l, 0.0).
    """
    ### BEGIN SOLUTION
    # m = max_j x_j, 0 for an all −inf row
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    # e_j = exp(x_j − m),  l = Σ_j e_j
    e = torch.exp(x - m)
    l = e.sum(dim=-1, keepdim=True)
    return torch.where(l > 0, e / l, 0.0)
    ### END SOLUTION


def online_softmax(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """softmax over the last dim with (m, l) gathered in ONE pass over blocks of ``block`` columns.

    x: (..., N) -> (..., N). Keep a running max m and a running sum l = Σ exp(x_j − m) over the
    columns seen so far. For the next block x_b:

        m_new = max(m, max x_b)
        l     = l · exp(m − m_new) + Σ_b exp(x_b − m_new)      (the old sum is rescaled to m_new)

    Only after the last block, write exp(x − m) / l. N need not be a multiple of ``block``.

    Hints:
      1. Start with m = −inf and l = 0, shaped x.shape[:-1].
      2. for start in range(0, N, block): x_b = x[..., start:start + block]
      3. Forgetting the factor exp(m − m_new) is the classic bug: the old terms were measured from the old max.
      4. Where m_new is still −inf (nothing visible yet) subtract 0 instead, as in safe_softmax.
    """
    ### BEGIN SOLUTION
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for start in range(0, x.shape[-1], block):
        x_b = x[..., start : start + block]
        # m_new = max(m, max_b x_b)
        m_new = torch.maximum(m, x_b.amax(dim=-1))
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)
        # l = l · exp(m − m_new) + Σ_b exp(x_b − m_new)
        l = l * torch.exp(m - m_safe) + torch.exp(x_b - m_safe[..., None]).sum(dim=-1)
        m = m_new
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    # softmax = exp(x − m) / l
    return torch.where(l[..., None] > 0, torch.exp(x - m_safe[..., None]) / l[..., None], 0.0)
    ### END SOLUTION


def merge_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state of the union of two disjoint slices of a score row (and of their value rows).

    A state of a slice s (with values v) is m = max s, l = Σ exp(s − m), o = Σ exp(s − m) v
    (o unnormalised; it may be None when there are no values). Shapes: m, l (...,), o (..., d).

        m = max(m_a, m_b),   α = exp(m_a − m),   β = exp(m_b − m)
        l = α l_a + β l_b,   o = α o_a + β o_b

    An empty slice has m = −inf, l = 0, o = 0; merging with it changes nothing (and gives no NaN).

    Hints:
      1. torch.maximum(a.m, b.m) is the new max.
      2. α and β rescale each sum from its own max to the common one; o needs them as α[..., None].
      3. When both m are −inf, exp(−inf − (−inf)) is NaN: subtract 0 instead where m is −inf.
      4. Return SoftmaxState(m, l, o), with o None when a.o is None.
    """
    ### BEGIN SOLUTION
    # m = max(m_a, m_b)
    m = torch.maximum(a.m, b.m)
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    # α = exp(m_a − m),  β = exp(m_b − m)
    alpha, beta = torch.exp(a.m - m_safe), torch.exp(b.m - m_safe)
    # l = α l_a + β l_b
    l = alpha * a.l + beta * b.l
    if a.o is None:
        return SoftmaxState(m, l, None)
    # o = α o_a + β o_b
    return SoftmaxState(m, l, alpha[..., None] * a.o + beta[..., None] * b.o)
    ### END SOLUTION
