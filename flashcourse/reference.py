"""Standard attention, written the way the formulas read: the ground truth for everything else.

It materialises the full score matrix S and probability matrix P, (B, H, Nq, Nk) each, so its memory
grows as N². It computes in float32 (float64 for float64 inputs) and returns the input's dtype.

Non-finite inputs propagate as in PyTorch's ``scaled_dot_product_attention``: a row whose scores hold
+inf or NaN (e.g. from an inf in k) gets O = NaN; a score of −inf only hides its key.
"""

from typing import Optional

import torch

from ._checks import (causal_mask, check_alibi_slopes, check_attention_inputs, check_dropout_p, check_flag, check_like,
                      check_softcap, check_window_size, compute_dtype, expand_kv, reduce_kv, softmax_scale, window_mask)


def _scores_and_probabilities(q, k, causal: bool, scale: float, *, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, dtype=None):
    """Upcast (to ``dtype``, default ``compute_dtype``), expand grouped heads, and return (Q, K, P, L)
    with L the natural-log logsumexp of the finished scores."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    ct = dtype or compute_dtype(q.dtype)
    Q = q.to(ct)
    K = expand_kv(k, H).to(ct)
    # S = scale · Q Kᵀ                                         (B, H, Nq, Nk)
    S = scale * (Q @ K.transpose(-2, -1))
    if softcap > 0:
        # S = cap · tanh(S / cap)                                soft-capping
        S = softcap * torch.tanh(S / softcap)
    if alibi_slopes is not None:
        # S_ij −= slope_h · |i + Nk − Nq − j|                    ALiBi, slopes (H,) or (B, H)
        i = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
        j = torch.arange(Nk, device=q.device)[None, :]
        S = S - alibi_slopes.to(ct).expand(B, H)[:, :, None, None] * (i - j).abs().to(ct)
    if causal or window_size != (-1, -1):
        mask = causal_mask(Nq, Nk, q.device) if window_size == (-1, -1) else window_mask(Nq, Nk, window_size,
                                                                                         causal=causal, device=q.device)
        S = S.masked_fill(~mask, float("-inf"))
    # L_i = log Σ_j exp(S_ij)                                   (B, H, Nq); -inf for a row with no key
    L = torch.logsumexp(S, dim=-1)
    # P_ij = exp(S_ij − L_i); a row with no key has P = 0 (not exp(-inf + inf) = NaN), a row with a
    # +inf or NaN score has P = NaN (L_i = +inf or NaN), as in SDPA
    P = torch.exp(S - torch.where(torch.isneginf(L), 0.0, L)[..., None])
    return Q, K, P, L


def naive_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0, dropout_mask: Optional[torch.Tensor] = None, upcast: bool = True):
    """O = softmax(scale · Q Kᵀ) V, the textbook way, with flash-attn's score options.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with H % Hkv == 0. Causal masking is bottom-right
    aligned (query i sees key j <= i + Nk - Nq). Returns O (B, H, Nq, d) in q's dtype and, with
    ``return_lse``, L (B, H, Nq), the logsumexp of each score row, in float32 (float64 for float64
    inputs). A row that sees no key gives O = 0 and L = -inf; a row with a +inf or NaN score (e.g. inf
    in k) gives O = NaN and a non-finite L, as SDPA does. Differentiable through PyTorch's autograd.

    Options, in the order they act on a score (as in the kernels, ``flashcourse/kernels/scores.py``):
    ``softcap`` > 0: s = cap · tanh(s / cap); ``alibi_slopes`` (H,) or (B, H) float32:
    s −= slope · |i + Nk − Nq − j|; ``window_size`` (left, right): query i sees keys
    i + Nk − Nq − left … i + Nk − Nq + right (−1: no limit); then the softmax; then dropout with the
    given ``dropout_mask`` (bool (B, H, Nq, Nk), True where a weight is kept; needed when dropout_p > 0,
    since the reference cannot replay the kernels' random numbers): kept weights scaled by 1 / (1 − p).
    ``upcast=False`` computes in the inputs' own dtype: flash-attn's low-precision reference, the
    baseline of its accuracy rule (a kernel's error at most twice this one's).
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("upcast", upcast)):
        check_flag(name, flag)
    scale = softmax_scale(scale, d)
    window_size, softcap = check_window_size(window_size), check_softcap(softcap)
    alibi_slopes, dropout_p = check_alibi_slopes(alibi_slopes, B, H, q.device), check_dropout_p(dropout_p)
    if dropout_p > 0 and (not isinstance(dropout_mask, torch.Tensor) or dropout_mask.shape != (B, H, Nq, Nk)):
        raise ValueError(f"dropout_p > 0 needs dropout_mask, a bool tensor (B, H, Nq, Nk) = {(B, H, Nq, Nk)} that is "
                         f"True where a weight is kept (the reference cannot replay a kernel's random numbers)")
    _, _, P, L = _scores_and_probabilities(q, k, causal, scale, window_size=window_size, softcap=softcap,
                                           alibi_slopes=alibi_slopes, dtype=None if upcast else q.dtype)
    if dropout_p > 0:
        # P_ij ∘ Z_ij / (1 − p)                                 dropout: the kept weights scaled up
        P = P.masked_fill(~dropout_mask.bool(), 0.0) / (1 - dropout_p)
    # O = P V                                                   (B, H, Nq, d)
    O = (P @ expand_kv(v, H).to(P.dtype)).to(q.dtype)
    return (O, L.to(compute_dtype(q.dtype))) if return_lse else O


def naive_attention_backward(q, k, v, o, do, *, causal: bool = False, scale: Optional[float] = None):
    """Gradients of naive attention from the explicit formulas; returns (dq, dk, dv). (For the score
    options, differentiate ``naive_attention`` itself with ``torch.autograd``.)

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
