"""The layers a user reaches for: FlashAttention inside ``nn.Module``s (chapter 08).

- ``flash_attn_func(q, k, v)``: the flash-attn package's function, layout (B, N, H, d).
- ``FlashAttention``: the flash-attn style module on a packed ``qkv`` of shape (B, N, 3, H, d).
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
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor in the flash-attn layout (B, N, H, d), got {got}")
    attention = _backend(backend)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale).transpose(1, 2)


def flash_attn_func(q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None):
    """FlashAttention in the flash-attn package's layout, for drop-in use.

    q: (B, Nq, H, d); k, v: (B, Nk, Hkv, d) with H % Hkv == 0. Returns O (B, Nq, H, d), a
    transposed view (use ``.reshape``, not ``.view``, to flatten the heads). Causal masking is
    bottom-right aligned, as in flash-attn >= 2.1. Differentiable with respect to q, k and v.
    """
    return _attention_bnhd(q, k, v, causal=causal, scale=softmax_scale, backend="flash")


def _packed_qkv_hint(shape) -> str:
    """How to turn a wrongly shaped packed tensor into (B, N, 3, H, d)."""
    if len(shape) == 3 and shape[-1] % 3 == 0:
        return (f"a (B, N, 3·E) output of one Linear(E, 3·E) layer splits with "
                f"qkv.view(B, N, 3, H, {shape[-1] // 3} // H) for H heads")
    if len(shape) == 4 and shape[2] == 3:
        return f"split the heads with qkv.view(B, N, 3, H, {shape[-1]} // H) for H heads"
    if len(shape) == 5 and 3 in shape:
        dim = list(shape).index(3)
        return (f"the q/k/v axis looks like dimension {dim}. If qkv stacks q, k, v along it, move it with "
                f"qkv.movedim({dim}, 2); if it is a Linear(E, 3·E) output viewed with the 3 in the wrong place, "
                f"its features are ordered (3, H, d): view that output as (B, N, 3, H, d) instead")
    return "stack q, k, v of shape (B, N, H, d) with torch.stack([q, k, v], dim=2)"


class FlashAttention(nn.Module):
    """Self-attention on a packed ``qkv`` (B, N, 3, H, d) -> (B, N, H, d), as in the flash-attn package.

    ``causal`` may be overridden per call. There are no parameters: the projections that produce
    qkv belong to the caller (see ``MultiHeadAttention``).
    """

    def __init__(self, causal: bool = False, softmax_scale: Optional[float] = None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale

    def forward(self, qkv: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        if not isinstance(qkv, torch.Tensor):
            raise TypeError(f"qkv must be a torch.Tensor of shape (B, N, 3, H, d), got {type(qkv).__name__}")
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(
                f"FlashAttention takes a packed qkv of shape (B, N, 3, H, d), got {tuple(qkv.shape)}; "
                f"{_packed_qkv_hint(tuple(qkv.shape))}"
            )
        q, k, v = qkv.unbind(dim=2)
        causal = self.causal if causal is None else causal
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=self.softmax_scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}"


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
