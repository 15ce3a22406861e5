"""Drop-in replacements for flash-attn 2.8's ``flash_attn.flash_attn_interface``, on the course's kernels.

``flash_attn_func``, ``flash_attn_kvpacked_func`` and ``flash_attn_qkvpacked_func`` take flash-attn's
arguments, in its order, with its defaults and meanings, and return what it returns:

- layout (B, N, H, d): q (B, Nq, H, d), k and v (B, Nk, Hkv, d) with H % Hkv == 0 (grouped-query
  heads: query heads h·H/Hkv .. (h+1)·H/Hkv − 1 read key/value head h), kv (B, Nk, 2, Hkv, d),
  qkv (B, N, 3, H, d);
- ``softmax_scale`` (default 1/√d) · QKᵀ → ``softcap`` (cap · tanh(s / cap), 0 = off) → ALiBi
  (``alibi_slopes`` float32 (H,) or (B, H): − slope · |i + Nk − Nq − j|) → ``causal`` / ``window_size``
  = (left, right) (query i sees keys i + Nk − Nq − left .. i + Nk − Nq + right, −1 = no limit, causal
  means right = 0; the mask is bottom-right aligned, and a row that sees no key gives 0) → softmax →
  dropout (``dropout_p``, seeded by torch's default generator of the device, so ``torch.manual_seed``
  repeats it; set it to 0.0 for evaluation);
- out (B, Nq, H, d), contiguous; with ``return_attn_probs`` the tuple (out, softmax_lse, S_dmask):
  softmax_lse (B, H, Nq) float32, the natural-log logsumexp of each score row, +inf for a row that
  sees no key (flash-attn's convention; inside flashcourse such a row has L = −inf); S_dmask (B, H,
  Nq rounded up to a multiple of 128, Nk likewise) in q's dtype when ``dropout_p`` > 0, else an empty
  tensor: exp(s_ij − m_i) with m_i the row maximum (normalise with exp(m_i − softmax_lse_i)), negated
  where the dropout dropped the weight, 0 where hidden and in the padding. As in flash-attn it is
  meant for testing.

Differences: float32 inputs and CPU tensors (in Triton's interpreter) are accepted too; head dims
1 to 256 need no padding. ``deterministic`` is accepted and changes nothing: the backward pass is
always deterministic (no atomics; a second run gives bitwise the same gradients). Variable-length
batches and the KV cache (``flash_attn_varlen_*``, ``flash_attn_with_kvcache``) are not here yet.
"""

from typing import Optional

import torch

from ._checks import check_dropout_p, check_flag
from .ops import flash_attention_outputs

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func"]


def check_bnhd(name: str, t) -> None:
    """A 4-d tensor in flash-attn's layout (the rest is checked by flash_attention)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 4-d tensor in the flash-attn layout (B, N, H, d), got {got}")


def _packed_hint(shape, parts: int) -> str:
    """How to turn a wrongly shaped packed tensor into (B, N, parts, H, d) (parts = 3 for qkv, 2 for kv)."""
    name = "qkv" if parts == 3 else "kv"
    if len(shape) == 3 and shape[-1] % parts == 0:
        return (f"a (B, N, {parts}·E) output of one Linear(E, {parts}·E) layer splits with "
                f"{name}.view(B, N, {parts}, H, {shape[-1] // parts} // H) for H heads")
    if len(shape) == 4 and shape[2] == parts:
        return f"split the heads with {name}.view(B, N, {parts}, H, {shape[-1]} // H) for H heads"
    if len(shape) == 5 and parts in shape:
        dim = list(shape).index(parts)
        return (f"the {'q/k/v' if parts == 3 else 'k/v'} axis looks like dimension {dim}. If {name} stacks them along it, "
                f"move it with {name}.movedim({dim}, 2); if it is a Linear(E, {parts}·E) output viewed with the "
                f"{parts} in the wrong place, its features are ordered ({parts}, H, d): view that output as "
                f"(B, N, {parts}, H, d) instead")
    tensors = "q, k, v" if parts == 3 else "k, v"
    return f"stack {tensors} of shape (B, N, H, d) with torch.stack([{tensors}], dim=2)"


def check_packed(name: str, t, parts: int) -> None:
    """``qkv`` (B, N, 3, H, d) or ``kv`` (B, N, 2, H, d), with a hint for the usual wrong shapes."""
    want = f"(B, N, {parts}, H, d)"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {want}, got {type(t).__name__}")
    if t.dim() != 5 or t.shape[2] != parts:
        raise ValueError(f"{name} must be a packed tensor of shape {want}, got {tuple(t.shape)}; "
                         f"{_packed_hint(tuple(t.shape), parts)}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: q (B, Nq, H, d), k, v (B, Nk, Hkv, d) -> out (B, Nq, H, d).

    With ``return_attn_probs``: (out, softmax_lse, S_dmask). See the module docstring for every
    argument; differentiable with respect to q, k and v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bnhd(name, t)
    check_flag("deterministic", deterministic)  # the backward is always deterministic
    check_flag("return_attn_probs", return_attn_probs)
    dropout_p = check_dropout_p(dropout_p)
    o, lse, S_dmask = flash_attention_outputs(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=softmax_scale,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        return_probs=return_attn_probs and dropout_p > 0, out_bnhd=True,
    )
    out = o.transpose(1, 2)  # (B, Nq, H, d), contiguous: the kernel wrote it in this layout
    if not return_attn_probs:
        return out
    # flash-attn marks a row that sees no key with softmax_lse = +inf (flashcourse: −inf)
    softmax_lse = torch.where(lse == float("-inf"), float("inf"), lse)
    return out, softmax_lse, S_dmask


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_kvpacked_func``: q (B, Nq, H, d), kv (B, Nk, 2, Hkv, d) -> out (B, Nq, H, d)."""
    check_packed("kv", kv, 2)
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (B, N, 3, H, d) -> out (B, N, H, d)."""
    check_packed("qkv", qkv, 3)
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def _get_block_size_n(device=None, head_dim: Optional[int] = None, is_dropout: bool = False,
                      is_causal: bool = False) -> int:
    """The key-block size by which S_dmask is scaled, for flash-attn's test helpers
    (``normalize_flash_attn_S``): flashcourse scales each whole row by its maximum, one block as wide
    as any sequence."""
    return 2**31 - 1
