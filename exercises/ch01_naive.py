# Your exercises: replace each stub, then run `flashcourse grade ch01`. Generated from solutions/.
"""Chapter 01: attention the textbook way, O = softmax(scale · Q Kᵀ) V.

Shapes: q (B, H, Nq, d); k, v (B, H, Nk, d) (the same number of heads H here). Run
`flashcourse grade ch01` to check your work.
"""

import math

import torch


def causal_mask(Nq: int, Nk: int) -> torch.Tensor:
    """A boolean (Nq, Nk) mask, True where query i may attend to key j.

    Causal attention is bottom-right aligned: query i sees key j iff  j <= i + (Nk − Nq).
    With Nq == Nk that is the lower triangle j <= i; with Nq < Nk (the queries are the last Nq of
    the keys' positions) every query sees Nk − Nq more keys; with Nq > Nk the first rows see none.

    Hints:
      1. torch.arange(Nq)[:, None] is a column of query indices i, torch.arange(Nk)[None, :] a row of j.
      2. Comparing the two broadcasts to an (Nq, Nk) boolean tensor.
      3. Check Nq=2, Nk=4 by hand: row 0 sees keys 0, 1, 2; row 1 sees all four.
    """
    raise NotImplementedError("ch01.causal_mask: not implemented yet")


def naive_attention(q, k, v, causal: bool = False, scale=None):
    """O = softmax(scale · Q Kᵀ) V, materialising the (Nq, Nk) score matrix of every head.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d). scale defaults to 1/sqrt(d). With ``causal``, the scores
    that ``causal_mask`` hides are set to −inf before the softmax. Returns O (B, H, Nq, d) in q's dtype.
    Compute in float32 (q.float()) so that float16 inputs keep their accuracy.

    Hints:
      1. S = scale · q @ k.transpose(-2, -1) has shape (B, H, Nq, Nk).
      2. S.masked_fill(~mask, float("-inf")) hides the future; torch.softmax(S, dim=-1) normalises rows.
      3. A row that sees no key (causal, Nq > Nk) is all −inf: its softmax is NaN; give it O = 0
         (torch.nan_to_num, or torch.where on the mask).
      4. Return (P @ v).to(q.dtype).
    """
    raise NotImplementedError("ch01.naive_attention: not implemented yet")
