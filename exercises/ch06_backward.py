# Your exercises: replace each stub, then run `flashcourse grade ch06`. Generated from solutions/.
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
    raise NotImplementedError("ch06.backward_delta: not implemented yet")


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
    raise NotImplementedError("ch06.naive_backward: not implemented yet")


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
    raise NotImplementedError("ch06.tiled_backward: not implemented yet")
