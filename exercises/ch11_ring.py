# Your exercises: replace each stub, then run `flashcourse grade ch11`. Generated from solutions/.
"""Chapter 11: the two pieces of ring attention that are yours to write.

Ring attention shards one sequence over P ranks. Each rank keeps its queries; the key/value shards
travel around the ring, and at every step the rank's kernel gives a *partial* result (O_b, L_b) over
just the visiting keys. ``fold`` merges it into the rank's running (O, L): chapter 02's
``merge_states``, on finalized states. ``shard_positions`` says which positions a rank holds: under a
causal mask the "zigzag" layout gives every rank an early and a late chunk, so that all ranks have
the same work at every step. Shapes: O (..., r, d), L (..., r). Run `flashcourse grade ch11` to check.
"""

import torch


def fold(O: torch.Tensor, L: torch.Tensor, O_b: torch.Tensor, L_b: torch.Tensor):
    """(O_new, L_new), float32: the output and logsumexp of the union of two disjoint sets of keys, from
    (O, L) over the first set and (O_b, L_b) over the second.

    O is normalised (O = Σ_j e^(s_j − L) v_j) and L = log Σ_j e^(s_j), so the unnormalised sums are
    e^L · O and e^(L_b) · O_b. Measured from m = max(L, L_b):

        α = e^(L − m),   β = e^(L_b − m)
        O_new = (α O + β O_b) / (α + β),   L_new = m + log(α + β)

    A row with L = −inf has seen no key yet: it takes the other side as it is, and two such rows stay
    (O = 0, L = −inf), never NaN. O and O_b may be float16 or bfloat16 (a kernel's output): compute
    in float32.

    Hints:
      1. m = torch.maximum(L, L_b); where m is −inf, subtract 0 instead (e^(−inf − (−inf)) is NaN).
      2. α and β broadcast over d as α[..., None].
      3. Where α + β = 0 (both −inf), divide by 1 and return L_new = −inf.
    """
    raise NotImplementedError("ch11.fold: not implemented yet")


def shard_positions(N: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """The positions (int64, N / P of them) of a length-N sequence that rank r of P holds, in its order.

    "contiguous": the r-th of P equal chunks, [r·N/P, (r+1)·N/P).
    "zigzag": the sequence cut into 2P equal chunks of c = N / 2P; rank r holds chunk r, then chunk
    2P − 1 − r: [r·c, (r+1)·c) followed by [(2P−1−r)·c, (2P−r)·c).

    Raise a ValueError for another layout, or when N is not divisible by the number of chunks.

    Hints:
      1. torch.arange(start, stop) is one chunk; torch.cat([...]) joins the two of zigzag.
      2. Check rank 0 of P = 2 with N = 8 by hand: zigzag gives [0, 1, 6, 7], contiguous [0, 1, 2, 3].
    """
    raise NotImplementedError("ch11.shard_positions: not implemented yet")
