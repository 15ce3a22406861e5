"""Standard attention, written the way the formulas read: the ground truth for everything else.

It materialises the full score matrix S and probability matrix P, (B, H, Nq, Nk) each, so its memory
grows as N². It computes in float32 (float64 for float64 inputs) and returns the input's dtype.

Non-finite inputs propagate as in PyTorch's ``scaled_dot_product_attention``: a row whose scores hold
+inf or NaN (e.g. from an inf in k) gets O = NaN; a score of −inf only hides its key.
"""

from typing import Optional

import torch

from ._checks import (causal_mask, check_attention_inputs, check_flag, check_like, compute_dtype, expand_kv, reduce_kv,
                      softmax_scale)


def _scores_and_probabilities(q, k, causal: bool, scale: float):
    """Upcast, expand grouped heads, and return (Q, K, P, L) with L the natural-log logsumexp."""
    B, H, Nq, d = q.shape
    ct = compute_dtype(q.dtype)
    Q = q.to(ct)
    K = expand_kv(k, H).to(ct)
    # S = scale · Q Kᵀ                                         (B, H, Nq, Nk)
    S = scale * (Q @ K.transpose(-2, -1))
    if causal:
        S = S.masked_fill(~causal_mask(Nq, K.shape[2], device=q.device), float("-inf"))
    # L_i = log Σ_j exp(S_ij)                                   (B, H, Nq); -inf for a row with no key
    L = torch.logsumexp(S, dim=-1)
    # P_ij = exp(S_ij − L_i); a row with no key has P = 0 (not exp(-inf + inf) = NaN), a row with a
    # +inf or NaN score has P = NaN (L_i = +inf or NaN), as in SDPA
    P = torch.exp(S - torch.where(torch.isneginf(L), 0.0, L)[..., None])
    return Q, K, P, L


def naive_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False):
    """O = softmax(scale · Q Kᵀ) V, the textbook way.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with H % Hkv == 0. Causal masking is bottom-right
    aligned (query i sees key j <= i + Nk - Nq). Returns O (B, H, Nq, d) in q's dtype and, with
    ``return_lse``, L (B, H, Nq), the logsumexp of each scaled score row, in float32 (float64 for
    float64 inputs). A row that sees no key gives O = 0 and L = -inf; a row with a +inf or NaN
    score (e.g. inf in k) gives O = NaN and a non-finite L, as SDPA does.
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = softmax_scale(scale, d)
    _, _, P, L = _scores_and_probabilities(q, k, causal, scale)
    # O = P V                                                   (B, H, Nq, d)
    O = (P @ expand_kv(v, H).to(P.dtype)).to(q.dtype)
    return (O, L) if return_lse else O


def naive_attention_backward(q, k, v, o, do, *, causal: bool = False, scale: Optional[float] = None):
    """Gradients of naive attention from the explicit formulas; returns (dq, dk, dv).

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d); o, do: (B, H, Nq, d). For grouped heads, dk and dv
    sum the contributions of every query head that reads the same key/value head.
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    check_like("o", o, q, "q")
    check_like("do", do, q, "q")
    check_flag("causal", causal)
    scale = softmax_scale(scale, d)
    Q, K, P, _ = _scores_and_probabilities(q, k, causal, scale)
    V, O, dO = expand_kv(v, H).to(P.dtype), o.to(P.dtype), do.to(P.dtype)
    # dV = Pᵀ dO
    dV = P.transpose(-2, -1) @ dO
    # dP = dO Vᵀ
    dP = dO @ V.transpose(-2, -1)
    # D_i = Σ_k dO_ik O_ik  (= Σ_j P_ij dP_ij)
    D = (dO * O).sum(dim=-1, keepdim=True)
    # dS = P ∘ (dP − D)
    dS = P * (dP - D)
    # dQ = scale · dS K,   dK = scale · dSᵀ Q
    dQ = scale * (dS @ K)
    dK = scale * (dS.transpose(-2, -1) @ Q)
    return dQ.to(q.dtype), reduce_kv(dK, Hkv).to(k.dtype), reduce_kv(dV, Hkv).to(v.dtype)
