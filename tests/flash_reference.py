"""flash-attn's score options written out plainly in PyTorch: the oracle of the option tests.

``reference_attention`` computes in any dtype: float64 for the oracle, and float16 / bfloat16 for
flash-attn's accuracy rule, which compares a kernel's error with that of "the same reference
computed in the low precision" (flash-attn's ``attention_ref(..., upcast=False)``). Layout
(B, H, N, d), as in the package.
"""

import torch


def visible(Nq: int, Nk: int, *, causal=False, window_size=(-1, -1), device=None) -> torch.Tensor:
    """(Nq, Nk) bool: query i sees key j iff i + Nk − Nq − left <= j <= i + Nk − Nq + right (−1: no limit)."""
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    i = torch.arange(Nq, device=device)[:, None] + (Nk - Nq)
    j = torch.arange(Nk, device=device)[None, :]
    seen = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    return seen


def reference_attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        dropout_p=0.0, keep=None, dtype=torch.float64):
    """O (B, H, Nq, d) in ``dtype``, differentiable in q, k, v.

    s = scale · q·k → softcap · tanh(s / softcap) → − slope · |i + Nk − Nq − j| → window mask →
    softmax (a row that sees no key gives 0) → dropout with ``keep`` (bool (B, H, Nq, Nk), True where
    the weight is kept), the kept weights scaled by 1 / (1 − dropout_p).
    """
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q, k, v = q.to(dtype), k.repeat_interleave(H // Hkv, 1).to(dtype), v.repeat_interleave(H // Hkv, 1).to(dtype)
    s = scale * (q @ k.transpose(-2, -1))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
        j = torch.arange(Nk, device=q.device)[None, :]
        slopes = alibi_slopes.to(dtype).expand(B, H)[:, :, None, None]
        s = s - slopes * (i - j).abs().to(dtype)
    seen = visible(Nq, Nk, causal=causal, window_size=window_size, device=q.device)
    s = s.masked_fill(~seen, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~seen.any(-1, keepdim=True), 0.0)
    if keep is not None:
        p = p.masked_fill(~keep, 0.0) / (1 - dropout_p)
    return p @ v


def max_error(got, want) -> float:
    """max |got − want|, in float64."""
    return (got.double() - want.double()).abs().max().item()
