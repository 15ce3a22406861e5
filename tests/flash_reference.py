"""The oracle of the kernel tests, as flash-attn's tests call theirs: ``flashcourse.naive_attention``.

``reference_attention`` runs it in any dtype: float64 for the oracle, and float16 / bfloat16 for
flash-attn's accuracy rule, which compares a kernel's error with that of "the same reference computed
in the low precision" (flash-attn's ``attention_ref(..., upcast=False)``). Layout (B, H, N, d).
"""

import torch

from flashcourse import naive_attention
from flashcourse._checks import window_mask


def visible(Nq: int, Nk: int, *, causal=False, window_size=(-1, -1), device=None) -> torch.Tensor:
    """(Nq, Nk) bool: query i sees key j iff i + Nk − Nq − left <= j <= i + Nk − Nq + right (−1: no limit)."""
    return window_mask(Nq, Nk, tuple(int(w) for w in window_size), causal=causal, device=device)


def reference_attention(q, k, v, *, keep=None, dtype=torch.float64, **options):
    """O (B, H, Nq, d) in ``dtype``, computed in ``dtype``, differentiable in q, k, v. ``options`` are
    naive_attention's (causal, scale, window_size, softcap, alibi_slopes, dropout_p); ``keep`` is the
    dropout mask (bool (B, H, Nq, Nk), True where the weight is kept)."""
    if "window_size" in options:
        options["window_size"] = tuple(int(w) for w in options["window_size"])
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return naive_attention(q, k, v, dropout_mask=keep, upcast=False, **options)


def max_error(got, want) -> float:
    """max |got − want|, in float64."""
    return (got.double().cpu() - want.double().cpu()).abs().max().item()
