"""Which rows of Q, K and V one sequence owns: dense batches, packed (variable-length) batches, a KV
cache with per-sequence lengths, left padding and pages. What the forward, dK/dV and dQ kernels share.

A batch element b of a dense call owns query rows 0 .. Nq − 1 and key rows 0 .. Nk − 1 of its own
(b, head) matrices. The other layouts say it with a few int32 tensors (flash-attn's names):

- ``cu_seqlens_q`` (B + 1,): the queries of all sequences packed one after another in a single batch
  element, sequence b in rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] − 1 (flash-attn's varlen
  layout); ``cu_seqlens_k`` the same for the keys;
- ``seqused_k`` (B,): sequence b uses only its first seqused_k[b] keys (a KV cache: cache_seqlens
  plus the keys just appended);
- ``leftpad_k`` (B,): sequence b's keys start at row leftpad_k[b] (and end at row seqused_k[b] − 1);
- ``block_table`` (B, pages per sequence): a paged cache. K and V are (pages, Hkv, page_size, d)
  and key row r of sequence b is row r % page_size of page block_table[b, r // page_size].

In every layout the queries of a sequence are the last Nq of its positions (offset = Nk − Nq for
the causal diagonal, the window and ALiBi), and a kernel works on the rows of its sequence only.
``Nq_max`` and ``Nk_max`` bound every sequence: the launch grid covers them, and the dropout's random
numbers are indexed on the (B, H, Nq_max, Nk_max) grid, the layout of the returned probabilities.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


class Sequences(NamedTuple):
    """Where each sequence's rows are (see the module docstring); None fields are the dense layout."""

    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None
    seqused_k: Optional[torch.Tensor] = None
    leftpad_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None

    @property
    def paged(self) -> bool:
        return self.block_table is not None


DENSE = Sequences()


def sequence_shape(q: torch.Tensor, k: torch.Tensor, seqs: Sequences) -> tuple[int, int, int]:
    """(B, Nq_max, Nk_max) of a call: q (B or 1, H, Nq, d); k (B or 1, Hkv, Nk, d), or pages."""
    if seqs.cu_seqlens_q is not None:
        B, Nq = seqs.cu_seqlens_q.numel() - 1, seqs.max_seqlen_q
    else:
        B, Nq = q.shape[0], q.shape[2]
    if seqs.cu_seqlens_k is not None:
        Nk = seqs.max_seqlen_k
    elif seqs.paged:
        Nk = seqs.block_table.shape[1] * k.shape[2]  # every page of the table
    else:
        Nk = k.shape[2]
    return B, Nq, Nk


def sequence_args(seqs: Sequences, k: torch.Tensor) -> tuple:
    """The kernel arguments CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K, BLOCK_TABLE, stride_table,
    page_size (None for what a layout does not use: Triton compiles the dense code for it)."""
    table = seqs.block_table
    if table is None:
        return seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.seqused_k, seqs.leftpad_k, None, 0, 0
    return seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.seqused_k, seqs.leftpad_k, table, table.stride(0), k.shape[2]


def batch_strides(t: torch.Tensor, packed: bool) -> tuple:
    """t's strides for the kernels, whose batch index is the sequence's: 0 for a packed tensor, whose
    sequences all lie in batch element 0."""
    return (0, *t.stride()[1:]) if packed else tuple(t.stride())


@triton.jit
def sequence_rows(b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, LEFTPAD_K, BLOCK_TABLE, Nq_max, Nk_max):
    """(q_start, Nq, k_start, Nk) of sequence b: its queries are rows q_start .. q_start + Nq − 1 of its
    batch element, its keys rows k_start .. k_start + Nk − 1 (of its pages, if paged)."""
    q_start = 0
    Nq = Nq_max
    k_start = 0
    Nk = Nk_max
    if CU_SEQLENS_Q is not None:
        q_start = tl.load(CU_SEQLENS_Q + b)
        Nq = tl.load(CU_SEQLENS_Q + b + 1) - q_start
    if CU_SEQLENS_K is not None:
        k_start = tl.load(CU_SEQLENS_K + b)
        Nk = tl.load(CU_SEQLENS_K + b + 1) - k_start
        if BLOCK_TABLE is not None:  # a paged sequence starts at row 0 of its first page
            k_start = 0
    if SEQUSED_K is not None:
        # never past the cache, whatever the lengths say
        Nk = tl.minimum(tl.load(SEQUSED_K + b), Nk_max)
    if LEFTPAD_K is not None:
        # keys leftpad .. seqused − 1
        pad = tl.load(LEFTPAD_K + b)
        k_start += pad
        Nk = tl.maximum(Nk - pad, 0)
    return q_start, Nq, k_start, Nk


@triton.jit
def kv_head(K, b, h_kv, k_start, stride_kb, stride_kh, stride_kn, BLOCK_TABLE):
    """The base of sequence b's keys in key/value head h_kv: key row j is at base + j · stride_kn; in a
    paged cache, the head in page 0 (``paged_offsets`` finds the rows)."""
    if BLOCK_TABLE is not None:
        return K + h_kv.to(tl.int64) * stride_kh
    else:
        return K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh + tl.cast(k_start, tl.int64) * stride_kn


@triton.jit
def paged_offsets(pages, rows, k_start, Nk, page_size, stride_page, stride_row):
    """Offsets (int64) of the key rows ``rows`` of a paged sequence from its head's base: row
    r = k_start + j lies in page pages[r // page_size], at row r % page_size (rows >= Nk: page 0)."""
    r = k_start + rows
    page = tl.load(pages + r // page_size, mask=rows < Nk, other=0)
    return page.to(tl.int64) * stride_page + (r % page_size).to(tl.int64) * stride_row
