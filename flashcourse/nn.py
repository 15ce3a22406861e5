"""The layers a user reaches for: FlashAttention inside ``nn.Module``s (chapter 08).

- ``flash_attn_func(q, k, v)``: the flash-attn package's function, layout (B, N, H, d) (from
  ``flashcourse.flash_attn_interface``, with its packed variants).
- ``FlashSelfAttention`` (alias ``FlashAttention``) on a packed ``qkv`` of shape (B, N, 3, H, d), and
  ``FlashCrossAttention`` on q and a packed ``kv``: flash-attn's ``flash_attn.modules.mha`` modules,
  variable-length sequences (``cu_seqlens``, ``max_seqlen``) included.
- ``MultiHeadAttention``: projections + attention, ``forward(x: (B, N, E)) -> (B, N, E)``, with a
  choice of backend ("flash", "tiled", "naive", "sdpa") so that one model can run on each of them.

Every backend takes the package's layout (B, H, N, d). The (B, N, H, d) tensors of this module reach
it as ``transpose(1, 2)`` views, which costs no copy: the kernels and the PyTorch paths take any strides.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import causal_mask
from .flash_attn_interface import (
    check_bnhd,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .flash_attn_interface import flash_attn_func  # noqa: F401  (re-exported: flashcourse.nn.flash_attn_func)
from .ops import flash_attention
from .reference import naive_attention
from .tiled import tiled_attention


def _sdpa(q, k, v, *, causal: bool, scale: Optional[float]):
    """PyTorch's own attention. Its ``is_causal`` is top-left aligned, so Nq != Nk gets an explicit mask."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = causal_mask(Nq, Nk, device=q.device) if causal and Nq != Nk else None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


# name -> attention(q (B, H, Nq, d), k, v (B, Hkv, Nk, d), *, causal, scale) -> O (B, H, Nq, d)
BACKENDS = {"flash": flash_attention, "tiled": tiled_attention, "naive": naive_attention, "sdpa": _sdpa}


def _backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return BACKENDS[name]


def _attention_bnhd(q, k, v, *, causal: bool, scale: Optional[float], backend: str):
    """Attention in the (B, N, H, d) layout: q (B, Nq, H, d), k, v (B, Nk, Hkv, d) -> (B, Nq, H, d).

    The result is a transposed view of the backend's (B, H, Nq, d) output; ``.reshape`` flattens it.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bnhd(name, t)
    attention = _backend(backend)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale).transpose(1, 2)


def _varlen(**lengths) -> bool:
    """Whether a module call is variable-length: cu_seqlens and max_seqlen given (and the same for k)."""
    given = [name for name, value in lengths.items() if value is not None]
    if given and len(given) != len(lengths):
        raise ValueError(f"a variable-length call passes {', '.join(lengths)} together; got only {', '.join(given)}")
    return bool(given)


class _FlashModule(nn.Module):
    """What flash-attn's two attention modules share: the options, kept as attributes."""

    def __init__(self, causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.window_size = window_size
        self.deterministic = deterministic

    def _options(self, causal: Optional[bool]) -> dict:
        """The keyword arguments of the flash-attn functions for this call (dropout in training only)."""
        return dict(dropout_p=self.drop.p if self.training else 0.0, softmax_scale=self.softmax_scale,
                    causal=self.causal if causal is None else causal, window_size=self.window_size,
                    alibi_slopes=self.alibi_slopes, deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}, window_size={self.window_size}"


class FlashSelfAttention(_FlashModule):
    """flash-attn's ``FlashSelfAttention`` (``flash_attn.modules.mha``): softmax attention on a packed
    qkv (B, N, 3, H, d) -> (B, N, H, d), with no parameters of its own.

    ``attention_dropout`` applies in training mode only (``module.train()``); ``causal`` may be
    overridden per call. The other arguments are those of ``flash_attn_qkvpacked_func``; the slopes
    are a buffer (they follow ``.to(device)``), and ``deterministic`` changes nothing: the backward is
    always deterministic.
    """

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, window_size=(-1, -1),
                 alibi_slopes=None, deterministic=False):
        super().__init__(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic)

    def forward(self, qkv, causal=None, cu_seqlens=None, max_seqlen=None):
        """qkv (B, N, 3, H, d) -> (B, N, H, d); with cu_seqlens (B + 1,) int32 and max_seqlen, the packed
        sequences qkv (total, 3, H, d) -> (total, H, d) (``flash_attn_varlen_qkvpacked_func``)."""
        if _varlen(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen):
            return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, **self._options(causal))
        return flash_attn_qkvpacked_func(qkv, **self._options(causal))


class FlashCrossAttention(_FlashModule):
    """flash-attn's ``FlashCrossAttention``: softmax attention of q (B, Nq, H, d) over a packed
    kv (B, Nk, 2, Hkv, d) -> (B, Nq, H, d). Arguments as in ``FlashSelfAttention``."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, alibi_slopes=None,
                 window_size=(-1, -1), deterministic=False):
        super().__init__(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic)

    def forward(self, q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None):
        """q (B, Nq, H, d), kv (B, Nk, 2, Hkv, d) -> (B, Nq, H, d); with cu_seqlens, max_seqlen (of q) and
        cu_seqlens_k, max_seqlen_k, packed sequences q (total_q, H, d), kv (total_k, 2, Hkv, d)."""
        if _varlen(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k):
            return flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                                                   **self._options(causal))
        return flash_attn_kvpacked_func(q, kv, **self._options(causal))


# the course's earlier name for the self-attention module
FlashAttention = FlashSelfAttention


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with grouped-query heads: (B, N, E) -> (B, N, E).

    One Linear maps x to q (H heads), k and v (Hkv = ``num_kv_heads`` heads each) of head dim
    d = E / H; the chosen backend attends; a second Linear mixes the heads back to E. ``backend``
    is a plain attribute: switch it at any time, the parameters stay the same.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, causal: bool = False,
                 backend: str = "flash", bias: bool = False):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}): each head gets "
                f"embed_dim // num_heads features"
            )
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads}): each key/value "
                f"head serves num_heads // num_kv_heads query heads"
            )
        _backend(backend)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.backend = causal, backend
        # W_qkv: E -> (H + 2·Hkv)·d, W_o: H·d -> E
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, N, embed_dim={self.embed_dim}), got {got}")
        B, N, E = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # [Q | K | V] = x W_qkv                                  (B, N, H·d + 2·Hkv·d)
        q, k, v = self.qkv_proj(x).split([H * d, Hkv * d, Hkv * d], dim=-1)
        # heads as views: (B, N, H, d) and (B, N, Hkv, d)
        q, k, v = q.unflatten(-1, (H, d)), k.unflatten(-1, (Hkv, d)), v.unflatten(-1, (Hkv, d))
        # O = softmax(Q Kᵀ / √d) V, per head                      (B, N, H, d)
        o = _attention_bnhd(q, k, v, causal=self.causal, scale=None, backend=self.backend)
        # concatenate the heads and mix them: O W_o                (B, N, E)
        return self.out_proj(o.reshape(B, N, E))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, backend={self.backend!r}")
