"""Chapter 03: attention tile by tile, as the FlashAttention forward kernel computes it.

Shapes: q (B, H, Nq, d); k, v (B, H, Nk, d). Run `flashcourse grade ch03` to check your work.
"""

import math

import torch


def tiled_attention_forward(q, k, v, causal: bool = False, scale=None, block_m: int = 16, block_n: int = 16):
    """O = softmax(scale · Q Kᵀ) V and the logsumexp L, never holding more than a B_r × B_c tile of scores.

    Cut Q into blocks Q_i of B_r = block_m rows and K, V into blocks K_j, V_j of B_c = block_n rows
    (the last block of each may be shorter). For each Q_i keep, per row, the running max m_i, the
    running sum l_i and the unnormalised output O_i, and fold in one key block at a time:

        S_ij = scale · Q_i K_jᵀ                         (−inf where causal hides key j from query i)
        m_new = max(m_i, rowmax(S_ij))
        P̃_ij = exp(S_ij − m_new),   α = exp(m_i − m_new)
        l_i = α l_i + rowsum(P̃_ij),  O_i = α O_i + P̃_ij V_j,   m_i = m_new

    and at the end O_i / l_i and L_i = m_i + log l_i. Causal is bottom-right aligned: query i sees key j
    iff j <= i + Nk − Nq; a row that sees no key gets O = 0 and L = −inf.

    Returns O (B, H, Nq, d) in q's dtype and L (B, H, Nq) in float32. Compute in float32.

    Hints:
      1. Two loops: for i0 in range(0, Nq, block_m) and, inside, for j0 in range(0, Nk, block_n).
      2. Batch over (B, H): Q[:, :, i0:i0 + block_m] is (B, H, B_r, d); m_i and l_i are (B, H, B_r).
      3. The causal mask of a tile compares absolute positions: rows i0 + r, columns j0 + c.
      4. Where m_new is −inf (nothing visible yet), subtract 0 instead, or exp gives NaN.
      5. L_i = m_i + log(l_i): the log of l_i alone misses the max that was factored out.
    """
    ### BEGIN SOLUTION
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    Q, K, V = q.float(), k.float(), v.float()
    O = torch.zeros(B, H, Nq, d)
    L = torch.full((B, H, Nq), float("-inf"))
    for i0 in range(0, Nq, block_m):
        Q_i = Q[:, :, i0 : i0 + block_m]
        B_r = Q_i.shape[2]
        rows = torch.arange(i0, i0 + B_r)
        m_i = torch.full((B, H, B_r), float("-inf"))
        l_i = torch.zeros(B, H, B_r)
        O_i = torch.zeros(B, H, B_r, d)
        for j0 in range(0, Nk, block_n):
            K_j, V_j = K[:, :, j0 : j0 + block_n], V[:, :, j0 : j0 + block_n]
            # S_ij = scale · Q_i K_jᵀ                        (B, H, B_r, B_c)
            S_ij = scale * (Q_i @ K_j.transpose(-2, -1))
            if causal:
                cols = torch.arange(j0, j0 + K_j.shape[2])
                S_ij = S_ij.masked_fill(cols[None, :] > rows[:, None] + (Nk - Nq), float("-inf"))
            # m_new = max(m_i, rowmax(S_ij))
            m_new = torch.maximum(m_i, S_ij.amax(dim=-1))
            m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)
            # P̃_ij = exp(S_ij − m_new),  α = exp(m_i − m_new)
            P_ij = torch.exp(S_ij - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            # l_i = α l_i + rowsum(P̃_ij),  O_i = α O_i + P̃_ij V_j
            l_i = alpha * l_i + P_ij.sum(dim=-1)
            O_i = alpha[..., None] * O_i + P_ij @ V_j
            m_i = m_new
        # O_i = O_i / l_i,  L_i = m_i + log l_i   (0 and −inf for a row that saw no key)
        O[:, :, i0 : i0 + B_r] = torch.where(l_i[..., None] > 0, O_i / l_i[..., None], 0.0)
        L[:, :, i0 : i0 + B_r] = torch.where(l_i > 0, m_i + torch.log(l_i), float("-inf"))
    return O.to(q.dtype), L
    ### END SOLUTION
