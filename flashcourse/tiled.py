"""FlashAttention-2 in plain PyTorch: the tiled loops of the kernels, without the kernels.

The queries are cut into blocks Q_i of B_r = ``block_m`` rows and the keys and values into blocks
K_j, V_j of B_c = ``block_n`` rows. The forward pass visits every (i, j) pair once, keeping only a
B_r × B_c tile of scores alive, and returns O and the logsumexp L; the backward pass recomputes each
tile of P from L instead of storing the N × N matrix. Every loop is batched over (B, H).
"""

from typing import Optional

import torch

from ._checks import (causal_offset, check_attention_inputs, check_flag, check_like, compute_dtype, expand_kv, reduce_kv,
                      softmax_scale)
from .softmax import shifted_exp


def _check_blocks(block_m: int, block_n: int) -> None:
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive int (rows per tile), got {b!r}")


def _tile_scores(Q_i, K_j, i0: int, j0: int, causal: bool, offset: int, scale: float):
    """S_ij = scale · Q_i K_jᵀ for the tile at rows i0.., columns j0..; −inf above the causal diagonal."""
    # S_ij = scale · Q_i K_jᵀ                                   (B, H, B_r, B_c)
    S_ij = scale * (Q_i @ K_j.transpose(-2, -1))
    B_r, B_c = S_ij.shape[-2:]
    # only a tile that crosses the diagonal needs a mask: key j visible iff j <= i + offset
    if causal and j0 + B_c - 1 > i0 + offset:
        rows = torch.arange(i0, i0 + B_r, device=S_ij.device)[:, None]
        cols = torch.arange(j0, j0 + B_c, device=S_ij.device)[None, :]
        S_ij = S_ij.masked_fill(cols > rows + offset, float("-inf"))
    return S_ij


def _key_end(i1: int, Nk: int, causal: bool, offset: int) -> int:
    """One past the last key any of the query rows < i1 can see: later key blocks are skipped."""
    return min(Nk, max(0, i1 + offset)) if causal else Nk


def tiled_attention_forward(q, k, v, *, causal=False, scale=None, block_m=64, block_n=64):
    """Tiled forward pass. q (B, H, Nq, d), k, v (B, Hkv, Nk, d) -> O (B, H, Nq, d), L (B, H, Nq).

    O has q's dtype; L (natural log) is float32, float64 for float64 inputs.
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    check_flag("causal", causal)
    _check_blocks(block_m, block_n)
    scale = softmax_scale(scale, d)
    ct, offset = compute_dtype(q.dtype), causal_offset(Nq, Nk)
    Q, K, V = q.to(ct), expand_kv(k, H).to(ct), expand_kv(v, H).to(ct)
    O = torch.empty(B, H, Nq, d, dtype=ct, device=q.device)
    L = torch.empty(B, H, Nq, dtype=ct, device=q.device)
    for i0 in range(0, Nq, block_m):
        Q_i = Q[:, :, i0 : i0 + block_m]
        B_r = Q_i.shape[2]
        # running statistics of the rows of block i: m_i = −inf, l_i = 0, O_i = 0
        m_i = torch.full((B, H, B_r), float("-inf"), dtype=ct, device=q.device)
        l_i = torch.zeros(B, H, B_r, dtype=ct, device=q.device)
        O_i = torch.zeros(B, H, B_r, d, dtype=ct, device=q.device)
        for j0 in range(0, _key_end(i0 + B_r, Nk, causal, offset), block_n):
            S_ij = _tile_scores(Q_i, K[:, :, j0 : j0 + block_n], i0, j0, causal, offset, scale)
            # m_i^new = max(m_i, rowmax(S_ij))
            m_new = torch.maximum(m_i, S_ij.amax(dim=-1))
            # P̃_ij = exp(S_ij − m_i^new)
            P_ij = shifted_exp(S_ij, m_new)
            # α = exp(m_i − m_i^new): how much the old sums shrink under the new max
            alpha = shifted_exp(m_i[..., None], m_new)[..., 0]
            # l_i = α l_i + rowsum(P̃_ij)
            l_i = alpha * l_i + P_ij.sum(dim=-1)
            # O_i = α O_i + P̃_ij V_j        (still unnormalised)
            O_i = alpha[..., None] * O_i + P_ij @ V[:, :, j0 : j0 + block_n]
            m_i = m_new
        # O_i = O_i / l_i, once, at the end; a row with no key (l_i = 0) keeps O_i = 0, a row with a
        # +inf or NaN score has l_i = NaN and stays NaN, as in SDPA
        O[:, :, i0 : i0 + B_r] = torch.where(l_i[..., None] == 0, 0.0, O_i / l_i[..., None])
        # L_i = m_i + log l_i   (−inf for a row with no key)
        L[:, :, i0 : i0 + B_r] = torch.where(l_i == 0, float("-inf"), m_i + torch.log(l_i))
    return O.to(q.dtype), L


def tiled_attention_backward(q, k, v, o, lse, do, *, causal=False, scale=None, block_m=64, block_n=64):
    """Tiled backward pass recomputing P from L. Returns (dq, dk, dv) shaped like (q, k, v).

    q, o, do: (B, H, Nq, d); k, v: (B, Hkv, Nk, d); lse: (B, H, Nq) from the forward pass.
    """
    B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
    check_like("o", o, q, "q")
    check_like("do", do, q, "q")
    check_flag("causal", causal)
    if tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"lse must have shape (B, H, Nq) = {(B, H, Nq)}, got {tuple(lse.shape)}")
    _check_blocks(block_m, block_n)
    scale = softmax_scale(scale, d)
    ct, offset = compute_dtype(q.dtype), causal_offset(Nq, Nk)
    Q, K, V = q.to(ct), expand_kv(k, H).to(ct), expand_kv(v, H).to(ct)
    dO, L = do.to(ct), lse.to(ct)
    # D_i = rowsum(dO_i ∘ O_i)                                  (B, H, Nq)
    D = (dO * o.to(ct)).sum(dim=-1)
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    for j0 in range(0, Nk, block_n):
        K_j, V_j = K[:, :, j0 : j0 + block_n], V[:, :, j0 : j0 + block_n]
        # causal: query rows i < j0 − offset see none of these keys, so their blocks are skipped
        first_row = max(0, j0 - offset) if causal else 0
        for i0 in range((first_row // block_m) * block_m, Nq, block_m):
            rows = slice(i0, i0 + block_m)
            S_ij = _tile_scores(Q[:, :, rows], K_j, i0, j0, causal, offset, scale)
            # P_ij = exp(S_ij − L_i)                             recomputed, never stored
            P_ij = shifted_exp(S_ij, L[:, :, rows])
            # dV_j += P_ijᵀ dO_i
            dV[:, :, j0 : j0 + block_n] += P_ij.transpose(-2, -1) @ dO[:, :, rows]
            # dP_ij = dO_i V_jᵀ
            dP_ij = dO[:, :, rows] @ V_j.transpose(-2, -1)
            # dS_ij = P_ij ∘ (dP_ij − D_i)
            dS_ij = P_ij * (dP_ij - D[:, :, rows, None])
            # dQ_i += scale · dS_ij K_j
            dQ[:, :, rows] += scale * (dS_ij @ K_j)
            # dK_j += scale · dS_ijᵀ Q_i
            dK[:, :, j0 : j0 + block_n] += scale * (dS_ij.transpose(-2, -1) @ Q[:, :, rows])
    return dQ.to(q.dtype), reduce_kv(dK, Hkv).to(k.dtype), reduce_kv(dV, Hkv).to(v.dtype)


class TiledAttention(torch.autograd.Function):
    """Autograd glue: the forward saves (q, k, v, O, L), the backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_m, block_n):
        O, L = tiled_attention_forward(q, k, v, causal=causal, scale=scale, block_m=block_m, block_n=block_n)
        ctx.save_for_backward(q, k, v, O, L)
        ctx.args = dict(causal=causal, scale=scale, block_m=block_m, block_n=block_n)
        ctx.mark_non_differentiable(L)
        return O, L

    @staticmethod
    def backward(ctx, dO, _dL):
        q, k, v, O, L = ctx.saved_tensors
        dq, dk, dv = tiled_attention_backward(q, k, v, O, L, dO, **ctx.args)
        return dq, dk, dv, None, None, None, None


def tiled_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
                    block_m: int = 64, block_n: int = 64):
    """Exact attention computed tile by tile, differentiable through its own tiled backward.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d). Returns O (B, H, Nq, d) and, with ``return_lse``,
    L (B, H, Nq). Same contract as ``naive_attention``, non-finite inputs included: a row with a
    +inf or NaN score gives O = NaN.
    """
    check_flag("return_lse", return_lse)
    O, L = TiledAttention.apply(q, k, v, causal, scale, block_m, block_n)
    return (O, L) if return_lse else O
