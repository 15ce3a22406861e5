"""Drop-in replacements for flash-attn 2.8's ``flash_attn.flash_attn_interface``, on the course's kernels.

``flash_attn_func``, ``flash_attn_kvpacked_func`` and ``flash_attn_qkvpacked_func``, their variable-length
forms ``flash_attn_varlen_func``, ``flash_attn_varlen_kvpacked_func`` and ``flash_attn_varlen_qkvpacked_func``,
and ``flash_attn_with_kvcache`` take flash-attn's arguments, in its order, with its defaults and
meanings, and return what it returns:

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

Variable length (varlen): the B sequences of a batch packed without padding, q (total_q, H, d), k and
v (total_k, Hkv, d), sequence b in rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] − 1 (cu_seqlens int32
(B + 1,); ``unpad_input`` / ``pad_input`` convert from and to a padded batch). Every rule above holds
per sequence, with Nq and Nk its own lengths (0 is allowed); out is (total_q, H, d), softmax_lse
(H, total_q), S_dmask (B, H, max_seqlen_q rounded up to 128, max_seqlen_k likewise). One kernel
launch covers all sequences, forward and backward. ``block_table`` makes k, v a paged cache
(forward only).

The KV cache: ``flash_attn_with_kvcache`` appends the new k, v to the cache in place, applies rotary
embeddings, and attends over each sequence's cached keys (``cache_seqlens``, ``cache_batch_idx``,
``cache_leftpad``, a paged ``block_table``), splitting long caches among several programs
(``num_splits``, split-KV decoding). Forward only, as in flash-attn.

Differences: float32 inputs and CPU tensors (in Triton's interpreter) are accepted too; head dims
1 to 256 need no padding; rotary dims need only be even, pages may have any size. ``deterministic`` is
accepted and changes nothing: the backward pass is always deterministic (no atomics; a second run
gives bitwise the same gradients).
"""

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_alibi_slopes, check_dropout_p, check_flag, check_softcap, check_window_size
from ._checks import softmax_scale as default_scale  # flash-attn's argument has this function's name
from .kernels.common import check_kernel_device
from .kernels.forward import MAX_HEAD_DIM, attention_forward
from .kernels.sequences import Sequences
from .kernels.splitkv import choose_num_splits
from .ops import KERNEL_DTYPES, check_index, flash_attention_outputs

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
           "unpad_input", "pad_input"]


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


def check_packed(name: str, t, parts: int, varlen: bool = False) -> None:
    """``qkv`` (B, N, 3, H, d) or ``kv`` (B, N, 2, H, d), with a hint for the usual wrong shapes;
    ``varlen``: (total, 3, H, d) or (total, 2, H, d)."""
    want = f"(total, {parts}, H, d)" if varlen else f"(B, N, {parts}, H, d)"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {want}, got {type(t).__name__}")
    if varlen and (t.dim() != 4 or t.shape[1] != parts):
        tensors = "q, k, v" if parts == 3 else "k, v"
        raise ValueError(f"{name} must be a packed tensor of shape {want}, got {tuple(t.shape)}; stack {tensors} "
                         f"of shape (total, H, d) with torch.stack([{tensors}], dim=1)")
    if not varlen and (t.dim() != 5 or t.shape[2] != parts):
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
    return out, flash_attn_lse(lse), S_dmask


def flash_attn_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn marks a row that sees no key with softmax_lse = +inf (flashcourse: −inf)."""
    return torch.where(lse == float("-inf"), float("inf"), lse)


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


# ------------------------------------------------------------------------------------------------
# Variable length: sequences packed without padding


def check_rows(name: str, t, want: str) -> None:
    """A 3-d tensor of packed rows (total, H, d) (the rest is checked by flash_attention)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 3-d tensor {want} of the packed sequences, got {got}; a padded "
                         f"(B, N, H, d) batch packs with flashcourse.flash_attn_interface.unpad_input")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: q (total_q, H, d), k, v (total_k, Hkv, d) -> out (total_q, H, d).

    Sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] − 1 of q and cu_seqlens_k[b] ..
    cu_seqlens_k[b + 1] − 1 of k and v (int32 (B + 1,)); max_seqlen_q / _k bound their lengths.
    Causal masks, windows and ALiBi are aligned per sequence (query i of a sequence with Nq queries and
    Nk keys sees key j <= i + Nk − Nq); ``alibi_slopes`` (H,) or (B, H). ``block_table`` (B, pages):
    k, v are a paged cache (pages, page_size, Hkv, d), sequence b's key j in row j % page_size of page
    block_table[b, j // page_size] (forward only). With ``return_attn_probs``: (out, softmax_lse
    (H, total_q), S_dmask (B, H, max_seqlen_q', max_seqlen_k')). Differentiable in q, k, v.
    """
    check_rows("q", q, "(total_q, H, d)")
    if block_table is None:
        check_rows("k", k, "(total_k, Hkv, d)")
        check_rows("v", v, "(total_k, Hkv, d)")
        k4, v4 = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    else:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"with a block_table, {name} must be a paged cache (pages, page_size, Hkv, d), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        k4, v4 = k.transpose(1, 2), v.transpose(1, 2)
    check_flag("deterministic", deterministic)  # the backward is always deterministic
    check_flag("return_attn_probs", return_attn_probs)
    dropout_p = check_dropout_p(dropout_p)
    sequences = Sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=block_table)
    # the packed rows as one batch element of a (1, H, total, d) view; out is written as (total, H, d)
    o, lse, S_dmask = flash_attention_outputs(
        q.transpose(0, 1)[None], k4, v4, causal=causal, scale=softmax_scale, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        return_probs=return_attn_probs and dropout_p > 0, out_bnhd=True, sequences=sequences,
    )
    out = o.transpose(1, 2)[0]
    if not return_attn_probs:
        return out
    return out, flash_attn_lse(lse[0]), S_dmask


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, H, d), kv (total_k, 2, Hkv, d) -> out."""
    check_packed("kv", kv, 2, varlen=True)
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, d) -> out (total, H, d)."""
    check_packed("qkv", qkv, 3, varlen=True)
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash-attn's ``bert_padding.unpad_input``: the tokens of a padded batch, packed.

    hidden_states (B, N, ...); attention_mask (B, N), bool or 0/1, true for a token; ``unused_mask``
    (B, N): tokens allocated but unused, kept too. Returns (hidden_states (total, ...), indices (total,)
    into the flattened (B·N) tokens, cu_seqlens int32 (B + 1,), max_seqlen int, seqused int32 (B,),
    the tokens of ``attention_mask`` alone).
    """
    masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = masks.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(masks.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return (hidden_states.flatten(0, 1)[indices], indices, cu_seqlens, int(seqlens.max()),
            attention_mask.sum(dim=-1, dtype=torch.int32))


def pad_input(hidden_states, indices, batch, seqlen):
    """flash-attn's ``bert_padding.pad_input``: packed tokens (total, ...) back to (batch, seqlen, ...),
    zeros where there is no token; differentiable."""
    out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    return out.index_put((indices,), hidden_states).unflatten(0, (batch, seqlen))


# ------------------------------------------------------------------------------------------------
# The KV cache


class CacheError(ValueError, RuntimeError):
    """Sequences that do not fit their KV cache: a ValueError, and a RuntimeError as flash-attn's checks raise."""


def apply_rotary(x, cos, sin, positions, interleaved: bool):
    """x (B, N, H, d) with its first rotary_dim = 2 · cos.shape[1] features rotated at ``positions`` (B, N).

    Each pair (x₁, x₂) of features — (0, 1), (2, 3), ... if ``interleaved``, else (i, i + rotary_dim/2)
    (GPT-NeoX) — at position p turns by the angle of row p of the tables: (x₁ cos − x₂ sin,
    x₁ sin + x₂ cos). Computed in float32, rounded once to x's dtype; a position past the tables is not
    turned (cos = 1, sin = 0), as in flash-attn's rotary kernel.
    """
    rd = 2 * cos.shape[1]
    inside = positions < cos.shape[0]
    p = torch.where(inside, positions, 0).long()
    c = torch.where(inside[..., None], cos[p].float(), 1.0)[:, :, None]  # (B, N, 1, rotary_dim / 2)
    s = torch.where(inside[..., None], sin[p].float(), 0.0)[:, :, None]
    xr = x[..., :rd].float()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    # (x₁, x₂) -> (x₁ cos − x₂ sin, x₁ sin + x₂ cos)
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., rd:]), dim=-1)


def _eager() -> bool:
    """Whether checks that read tensor values (and wait for the GPU) run: not under torch.compile."""
    return not torch.compiler.is_compiling()


def _check_cache(q, k_cache, v_cache, k, v, block_table):
    """Shapes, dtypes and devices of a KV-cache call; returns (B, Nq, H, Hkv, d, Nnew)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_bnhd(name, t)
    B, Nq, H, d = q.shape
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"flash_attn_with_kvcache runs float16, bfloat16 and float32 tensors, got {q.dtype}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim d = {d} is too large for the Triton kernels (d <= {MAX_HEAD_DIM})")
    paged = block_table is not None
    layout = "(pages, page_size, Hkv, d) with a block_table" if paged else "(B_cache, N_cache, Hkv, d)"
    Hkv = k_cache.shape[2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}: they must match")
        if tuple(t.shape) != tuple(k_cache.shape) or t.shape[3] != d:
            raise ValueError(f"k_cache and v_cache must be {layout} with q's head dim d = {d}, got "
                             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"q has {H} heads and the cache {Hkv}: grouped-query attention needs H % Hkv == 0")
    if (k is None) != (v is None):
        raise ValueError("pass the new k and v together (both None: attend over the cache as it is)")
    Nnew = 0
    if k is not None:
        check_bnhd("k", k)
        Nnew = k.shape[1]
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != (B, Nnew, Hkv, d) or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must be the new keys/values (B, N_new, Hkv, d) = {(B, Nnew, Hkv, d)}, "
                                 f"{q.dtype} on {q.device}; got {tuple(t.shape)}, {t.dtype} on {t.device}")
    check_kernel_device(q=q, k_cache=k_cache, v_cache=v_cache)
    return B, Nq, H, Hkv, d, Nnew


def _check_rotary(rotary_cos, rotary_sin, d: int, capacity: int, appending: bool, device) -> None:
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("pass rotary_cos and rotary_sin together")
    if not appending:
        raise ValueError("rotary embeddings turn the new k and q: pass k and v with rotary_cos and rotary_sin")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point() or t.device != device:
            raise ValueError(f"{name} must be a floating-point tensor (positions, rotary_dim / 2) on {device}")
    if rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > d:
        raise ValueError(f"rotary_cos and rotary_sin must both be (positions, rotary_dim / 2) with rotary_dim <= "
                         f"d = {d}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    if rotary_cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos and rotary_sin have {rotary_cos.shape[0]} positions, fewer than the "
                         f"{capacity} of the KV cache: give one row per position of the cache")


def _cache_lengths(cache_seqlens, B: int, device) -> torch.Tensor:
    """cache_seqlens as an int32 (B,) tensor (flash-attn takes an int for all sequences)."""
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        return torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=device)
    check_index("cache_seqlens", cache_seqlens, (B,), device, "the number of keys already in each sequence's cache")
    return cache_seqlens


def _append(cache, new, cache_rows, positions, page_size: Optional[int]) -> None:
    """cache[row, position] = new in place: (B, N_new) positions of sequences in the cache rows
    ``cache_rows`` (B,), or, paged, of the pages ``cache_rows`` (B, pages) of ``page_size`` rows."""
    if page_size is None:
        cache[cache_rows.long()[:, None], positions] = new
    else:
        pages = torch.gather(cache_rows.long(), 1, positions // page_size)
        cache[pages, positions % page_size] = new


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``: q (B, Nq, H, d) over a KV cache -> out (B, Nq, H, d).

    k_cache, v_cache (B_cache, N_cache, Hkv, d), or a paged cache (pages, page_size, Hkv, d) with
    ``block_table`` int32 (B, pages per sequence). Sequence b's cache holds ``cache_seqlens``[b] keys
    (an int or int32 (B,); None: the whole cache), in cache row ``cache_batch_idx``[b] (int32 (B,);
    default b), starting at ``cache_leftpad``[b] (int32 (B,); default 0).

    1. The new ``k``, ``v`` (B, N_new, Hkv, d), if given, are written into the cache in place at
       positions cache_seqlens[b] .. cache_seqlens[b] + N_new − 1, k turned by the rotary embedding
       (``rotary_cos``, ``rotary_sin``: (positions, rotary_dim / 2), ``rotary_interleaved``) at those
       positions. q is turned too: at cache_seqlens[b] + i if causal or windowed, else all at
       cache_seqlens[b].
    2. q attends over keys leftpad .. cache_seqlens[b] + N_new − 1 of its cache, with flash-attn's
       options (module docstring), the queries being the last Nq positions.

    ``num_splits``: 1 one program per (sequence, head, query block); > 1 the keys are split among that
    many programs, merged after (split-KV decoding); 0 chooses (flash-attn's heuristic, from the
    programs, the SMs and the cache length). With one query (Nq = 1), grouped heads and no window or
    ALiBi, the H / Hkv query heads of a group are the rows of one program (flash-attn's trick).
    Returns out, or (out, softmax_lse (B, H, Nq)) with ``return_softmax_lse``. No backward.
    """
    B, Nq, H, Hkv, d, Nnew = _check_cache(q, k_cache, v_cache, k, v, block_table)
    page_size, capacity = _check_cache_rows(k_cache, B, cache_batch_idx, cache_leftpad, block_table, q.device)
    if cache_seqlens is None and k is not None:
        raise ValueError("to append k and v, pass cache_seqlens: the number of keys already in each sequence's cache")
    lengths = None if cache_seqlens is None else _cache_lengths(cache_seqlens, B, q.device)
    _check_rotary(rotary_cos, rotary_sin, d, capacity, k is not None, q.device)
    if lengths is not None and (block_table is not None or k is not None) and _eager():
        # writes and pages must stay inside the cache (flash-attn checks the block table the same way)
        longest = int(lengths.max()) + Nnew
        if longest > capacity:
            where = f"the block_table's {capacity // page_size} pages of {page_size}" if page_size else "k_cache's"
            raise CacheError(f"max(cache_seqlens) + N_new = {longest} keys do not fit in {where} {capacity} "
                             f"rows: give block_table more pages or the cache more rows")
    scale = default_scale(softmax_scale, d)
    causal = check_flag("causal", causal)
    left, right = check_window_size(window_size)
    softcap = check_softcap(softcap)
    alibi_slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)
    check_flag("rotary_interleaved", rotary_interleaved)
    check_flag("return_softmax_lse", return_softmax_lse)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen by a heuristic, 1: no split), got {num_splits!r}")

    # 1. the new keys and values, k turned by the rotary embedding, written into the cache in place
    if k is not None:
        positions = lengths.long()[:, None] + torch.arange(Nnew, device=q.device)  # (B, N_new)
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        rows = block_table if block_table is not None else (
            cache_batch_idx if cache_batch_idx is not None else torch.arange(B, device=q.device))
        _append(k_cache, k, rows, positions, page_size)
        _append(v_cache, v, rows, positions, page_size)
    if rotary_cos is not None:
        # causal or windowed: query i is at position cache_seqlens + i; otherwise all at cache_seqlens
        windowed = 0 <= left < capacity or 0 <= right < capacity
        steps = torch.arange(Nq, device=q.device) * (causal or windowed)
        q = apply_rotary(q, rotary_cos, rotary_sin, lengths.long()[:, None] + steps, rotary_interleaved)

    # 2. attention over each sequence's keys leftpad .. cache_seqlens + N_new − 1 of its cache row or pages;
    # a cache row per sequence is a paged cache of one page per sequence
    table = block_table if block_table is not None else (None if cache_batch_idx is None else cache_batch_idx[:, None])
    sequences = Sequences(seqused_k=None if lengths is None else lengths + Nnew, leftpad_k=cache_leftpad,
                          block_table=table)
    if Nq == 1 and alibi_slopes is None:
        causal = False  # one query, the last position, sees every key
    out, lse = _attend_cache(q, k_cache, v_cache, sequences, capacity, num_splits, causal=causal, scale=scale,
                             window_size=(left, right), softcap=softcap, alibi_slopes=alibi_slopes)
    return (out, flash_attn_lse(lse)) if return_softmax_lse else out


def _check_cache_rows(k_cache, B: int, cache_batch_idx, cache_leftpad, block_table, device):
    """The cache's row arguments, checked: returns (page_size, keys a sequence's cache holds); page_size
    is None without a block table."""
    if cache_leftpad is not None:
        check_index("cache_leftpad", cache_leftpad, (B,), device, "where each sequence starts in its cache")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("a paged cache (block_table) takes no cache_batch_idx: its rows are the block table's")
        pages = block_table.shape[-1] if isinstance(block_table, torch.Tensor) else 0
        check_index("block_table", block_table, (B, pages), device, "the pages of each sequence")
        return k_cache.shape[1], pages * k_cache.shape[1]
    if cache_batch_idx is not None:
        check_index("cache_batch_idx", cache_batch_idx, (B,), device, "the cache row of each sequence")
        if _eager() and not 0 <= int(cache_batch_idx.min()) <= int(cache_batch_idx.max()) < k_cache.shape[0]:
            raise CacheError(f"cache_batch_idx holds rows outside the {k_cache.shape[0]} rows of k_cache")
    return None, k_cache.shape[1]


def _attend_cache(q, k_cache, v_cache, sequences: Sequences, capacity: int, num_splits: int, **options):
    """(out (B, Nq, H, d), L (B, H, Nq)) of q over the caches, ``num_splits`` 0 chosen by the heuristic.

    One query, grouped heads, no window or ALiBi: the H / Hkv query heads of a group are the rows of one
    (sequence, key/value head) program, which then reads its keys once (flash-attn's trick).
    """
    B, Nq, H, d = q.shape
    Hkv = k_cache.shape[2]
    rows_of_heads = (Nq == 1 and H > Hkv and not options["causal"] and options["window_size"] == (-1, -1)
                     and options["alibi_slopes"] is None)
    if rows_of_heads:
        qh = q.reshape(B, Hkv, H // Hkv, d)
        out = torch.empty(qh.shape, dtype=q.dtype, device=q.device)
    else:
        qh = q.transpose(1, 2)
        out = torch.empty((B, Nq, H, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    programs, rows = B * qh.shape[1], qh.shape[2]
    decode = rows <= 16  # the decoding configurations: B_r = 16
    if num_splits == 0:
        num_splits = choose_num_splits(programs * math.ceil(rows / (16 if decode else 64)), capacity, d, q.device)
    out, lse = attention_forward(qh, k_cache.transpose(1, 2), v_cache.transpose(1, 2), out=out, sequences=sequences,
                                 num_splits=num_splits, decode=decode, **options)
    if rows_of_heads:
        return out.reshape(B, Nq, H, d), lse.reshape(B, H, Nq)
    return out.transpose(1, 2), lse


def _get_block_size_n(device=None, head_dim: Optional[int] = None, is_dropout: bool = False,
                      is_causal: bool = False) -> int:
    """The key-block size by which S_dmask is scaled, for flash-attn's test helpers
    (``normalize_flash_attn_S``): flashcourse scales each whole row by its maximum, one block as wide
    as any sequence."""
    return 2**31 - 1
