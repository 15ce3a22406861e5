"""How many bytes attention moves between HBM and the chip, counted by walking its loops.

Standard attention runs three passes, each reading its inputs from HBM and writing its result back:
S = QKᵀ, P = softmax(S), O = PV. The N × N matrices S and P make its traffic Θ(N·d + N²).

FlashAttention (FA-2 loop order) keeps a query block Q_i of B_r rows on chip, streams every key and
value block K_j, V_j past it, and writes O_i and L_i once. With an on-chip memory (SRAM) of M elements
the blocks are B_c = ⌈M / 4d⌉ and B_r = min(B_c, d) (FlashAttention paper, Algorithm 1), so K and V
are read N / B_r times: Θ(N²·d² / M) in all.

All counts are per (batch, head) and in bytes; ``bytes_per_element`` is 2 for fp16/bf16.
"""

import math
from typing import NamedTuple, Optional


class IOCount(NamedTuple):
    """Bytes read from and written to HBM."""

    reads: int
    writes: int

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __add__(self, other):
        return IOCount(self.reads + other.reads, self.writes + other.writes)


def block_sizes(M: int, d: int):
    """(B_r, B_c) for an SRAM of M elements: B_c = ⌈M / 4d⌉, B_r = min(B_c, d)."""
    if M < 4 * d:
        raise ValueError(f"SRAM of M={M} elements cannot hold even one row of Q, K, V and O at d={d}: need M >= 4d")
    B_c = math.ceil(M / (4 * d))
    return min(B_c, d), B_c


def standard_attention_io(N: int, d: int, *, bytes_per_element: int = 2, row_block: int = 128) -> IOCount:
    """Walk the three passes of standard attention over blocks of ``row_block`` rows.

    Each pass reads its inputs once and writes its output once (the best a separate kernel can do).
    """
    e, io = bytes_per_element, IOCount(0, 0)
    for i0 in range(0, N, row_block):
        rows = min(row_block, N - i0)
        # pass 1: S_i = Q_i Kᵀ — read Q_i (K is counted once below), write S_i
        io += IOCount(rows * d * e, rows * N * e)
        # pass 2: P_i = softmax(S_i) — read S_i, write P_i
        io += IOCount(rows * N * e, rows * N * e)
        # pass 3: O_i = P_i V — read P_i (V counted once below), write O_i
        io += IOCount(rows * N * e, rows * d * e)
    # K in pass 1 and V in pass 3, each read once
    return io + IOCount(2 * N * d * e, 0)


def flash_attention_io(N: int, d: int, M: Optional[int] = None, *, block_m: Optional[int] = None,
                       block_n: Optional[int] = None, causal: bool = False, bytes_per_element: int = 2) -> IOCount:
    """Walk FlashAttention's forward loops (query blocks outside, key blocks inside) and count bytes.

    Give either the SRAM size ``M`` (in elements; the paper's block sizes follow) or ``block_m`` and
    ``block_n`` directly. With ``causal``, key blocks entirely above the diagonal are skipped.
    """
    if M is not None:
        block_m, block_n = block_sizes(M, d)
    if block_m is None or block_n is None:
        raise ValueError("give the SRAM size M, or both block_m and block_n")
    e, io = bytes_per_element, IOCount(0, 0)
    for i0 in range(0, N, block_m):
        B_r = min(block_m, N - i0)
        # read Q_i once
        io += IOCount(B_r * d * e, 0)
        kv_end = min(N, i0 + B_r) if causal else N
        for j0 in range(0, kv_end, block_n):
            B_c = min(block_n, N - j0)
            # read K_j and V_j, for every query block
            io += IOCount(2 * B_c * d * e, 0)
        # write O_i and L_i once (L in float32)
        io += IOCount(0, B_r * d * e + B_r * 4)
    return io


def standard_closed_form(N: int, d: int, *, bytes_per_element: int = 2) -> int:
    """Exact total of ``standard_attention_io``: 4·N·d + 4·N² elements — Θ(N·d + N²)."""
    return (4 * N * d + 4 * N * N) * bytes_per_element


def flash_closed_form(N: int, d: int, M: int, *, bytes_per_element: int = 2) -> int:
    """Exact total of ``flash_attention_io`` (no causal) when B_r divides N and B_c divides N.

    2·N·d (Q read, O written) + 4 bytes·N (L) + T_r · 2·N·d (K and V per query block), T_r = N / B_r.
    With B_r = Θ(M / d) the last term is Θ(N²·d² / M).
    """
    B_r, _ = block_sizes(M, d)
    return (2 * N * d + 2 * N * N * d // B_r) * bytes_per_element + 4 * N
