# Your exercises: replace each stub, then run `flashcourse grade ch08`. Generated from solutions/.
"""Chapter 08: FlashAttention inside a Transformer layer, an ``nn.Module`` on (B, N, E) activations.

A Transformer keeps its activations as x (B, N, E) with E = H · d; attention wants (B, H, N, d).
Run `flashcourse grade ch08` to check your work.
"""

from typing import Optional

import torch
from torch import nn

import flashcourse


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, num_heads · d) -> (B, num_heads, N, d): head h takes the features h·d ... (h+1)·d − 1.

    Hints:
      1. x.view(B, N, num_heads, d) names the heads; then swap N and the heads with transpose(1, 2).
      2. No copy is needed: the kernels take any strides.
    """
    raise NotImplementedError("ch08.split_heads: not implemented yet")


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H · d), the inverse of split_heads.

    Hints:
      1. transpose(1, 2) back to (B, N, H, d), then flatten the last two dims.
      2. .view fails on the transposed tensor; .reshape copies when it must.
    """
    raise NotImplementedError("ch08.merge_heads: not implemented yet")


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with grouped key/value heads: x (B, N, E) -> (B, N, E).

    Given: one Linear qkv_proj maps x to [Q | K | V] with H heads for Q and Hkv = num_kv_heads heads
    for K and V, each of head dim d = E / H; out_proj mixes the heads back to E. The attention itself
    is ``self.attention(q, k, v, causal=...)`` (flashcourse.flash_attention, the Triton kernels),
    which takes q (B, H, N, d) and k, v (B, Hkv, N, d).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, causal: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.attention = flashcourse.flash_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = merge_heads(attention(Q, K, V)) W_o with [Q | K | V] = x W_qkv.

        Hints:
          1. self.qkv_proj(x).split([H · d, Hkv · d, Hkv · d], dim=-1) gives the three projections.
          2. split_heads each of them (K and V with num_kv_heads heads).
          3. Pass causal=self.causal; merge_heads the output, then self.out_proj.
        """
        raise NotImplementedError("ch08.MultiHeadAttention.forward: not implemented yet")
