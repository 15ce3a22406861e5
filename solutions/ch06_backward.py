"""Chapter 06: the backward pass of attention, first with whole matrices, then tile by tile.

Forward: S = scale · Q Kᵀ, P = softmax(S) (row-wise), O = P V, and the logsumexp L = log Σ_j exp(S_ij).
Given dO = ∂loss/∂O, the gradients are

    dV = Pᵀ dO        dP = dO Vᵀ        dS = P ∘ (dP − D)  with  D_i = Σ_j P_ij dP_ij = rowsum(dO_i ∘ O_i)
    dQ = scale · dS K        dK = scale · dSᵀ Q

Shapes: q, o, do (B, H, Nq, d); k, v (B, H, Nk, d); lse and D (B, H, Nq). Causal masking is
bottom-right aligned (query i sees key j iff j <= i + Nk − Nq). Run `flashcourse grade ch06` to check.
"""

import math

import torch


def backward_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """D_i = rowsum(dO_i ∘ O_i): (B, H, Nq, d) twice -> (B, H, Nq) in float32.

    D replaces Σ_j P_ij dP_ij, which would need the whole row of P; one number per query row.

    Hints:
      1. Multiply elementwise, sum over the last dim.
      2. Upcast first (.float()) so that float16 inputs give an accurate float32 D.
    """
    ### BEGIN SOLUTION
    # D_i = Σ_k dO_ik O_ik
    return (do.float() * o.float()).sum(dim=-1)
    ### END SOLUTION


def naive_backward(q, k, v, o, do, causal: bool = False, scale=None):
    """(dq, dk, dv) from the formulas above with the whole (Nq, Nk) matrices P, dP, dS.

    Recompute S and P as in the forward pass (softmax with the causal mask), in float32, then apply
    the formulas. Return dq like q and dk, dv like k, v (shape and dtype).

    Hints:
      1. P = torch.softmax(S, dim=-1), with S masked to −inf where causal hides a key; a row that
         sees no key gives NaN there: set it to 0 (P.nan_to_num(0.0)).
      2. D = backward_delta(o, do)[..., None] broadcasts over the keys.
      3. scale multiplies dQ and dK once (it is the derivative of S = scale · Q Kᵀ), not dV.
    """
    ### BEGIN SOLUTION
    Nq, Nk = q.shape[2], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    Q, K, V, dO = q.float(), k.float(), v.float(), do.float()
    S = scale * (Q @ K.transpose(-2, -1))
    if causal:
        visible = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
        S = S.masked_fill(~visible, float("-inf"))
    P = torch.softmax(S, dim=-1).nan_to_num(0.0)
    # dV = Pᵀ dO
    dV = P.transpose(-2, -1) @ dO
    # dP = dO Vᵀ
    dP = dO @ V.transpose(-2, -1)
    # dS = P ∘ (dP − D)
    dS = P * (dP - backward_delta(o, do)[..., None])
    # dQ = scale · dS K,   dK = scale · dSᵀ Q
    dQ = scale * (dS @ K)
    dK = scale * (dS.transpose(-2, -1) @ Q)
    return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype)
    ### END SOLUTION


def tiled_backward(q, k, v, o, lse, do, causal: bool = False, scale=None, block_m: int = 16, block_n: int = 16):
    """(dq, dk, dv) tile by tile, recomputing each tile of P from the logsumexp instead of storing P.

    Loop over key blocks K_j, V_j (B_c = block_n rows) and, inside, over query blocks Q_i (B_r =
    block_m rows). For each tile:

        S_ij = scale · Q_i K_jᵀ  (−inf where causal hides a key)      P_ij = exp(S_ij − L_i)
        dV_j += P_ijᵀ dO_i       dP_ij = dO_i V_jᵀ       dS_ij = P_ij ∘ (dP_ij − D_i)
        dQ_i += scale · dS_ij K_j                 dK_j += scale · dS_ijᵀ Q_i

    lse: L (B, H, Nq) from the forward pass, float32; −inf for a row that sees no key.
    Return dq like q and dk, dv like k, v. Compute in float32.

    Hints:
      1. D = backward_delta(o, do) once, before the loops.
      2. exp(S_ij − L_i) is already normalised: no max and no sum are needed in the backward pass.
      3. A row with L_i = −inf: subtract 0 instead (its S_ij are all −inf, so P_ij = 0, not NaN).
      4. Accumulate into zero tensors dQ, dK, dV of float32 and cast at the end.
    """
    ### BEGIN SOLUTION
    Nq, Nk = q.shape[2], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    Q, K, V, dO = q.float(), k.float(), v.float(), do.float()
    L = torch.where(torch.isneginf(lse), 0.0, lse.float())
    D = backward_delta(o, do)
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    for j0 in range(0, Nk, block_n):
        K_j, V_j = K[:, :, j0 : j0 + block_n], V[:, :, j0 : j0 + block_n]
        cols = torch.arange(j0, j0 + K_j.shape[2])
        for i0 in range(0, Nq, block_m):
            Q_i, dO_i = Q[:, :, i0 : i0 + block_m], dO[:, :, i0 : i0 + block_m]
            L_i, D_i = L[:, :, i0 : i0 + block_m], D[:, :, i0 : i0 + block_m]
            # S_ij = scale · Q_i K_jᵀ
            S_ij = scale * (Q_i @ K_j.transpose(-2, -1))
            if causal:
                rows = torch.arange(i0, i0 + Q_i.shape[2])
                S_ij = S_ij.masked_fill(cols[None, :] > rows[:, None] + (Nk - Nq), float("-inf"))
            # P_ij = exp(S_ij − L_i)
            P_ij = torch.exp(S_ij - L_i[..., None])
            # dV_j += P_ijᵀ dO_i
            dV[:, :, j0 : j0 + block_n] += P_ij.transpose(-2, -1) @ dO_i
            # dP_ij = dO_i V_jᵀ,  dS_ij = P_ij ∘ (dP_ij − D_i)
            dS_ij = P_ij * (dO_i @ V_j.transpose(-2, -1) - D_i[..., None])
            # dQ_i += scale · dS_ij K_j,  dK_j += scale · dS_ijᵀ Q_i
            dQ[:, :, i0 : i0 + block_m] += scale * (dS_ij @ K_j)
            dK[:, :, j0 : j0 + block_n] += scale * (dS_ij.transpose(-2, -1) @ Q_i)
    return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype)
    ### END SOLUTION
