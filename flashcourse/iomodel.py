"""How many bytes attention moves between HBM and the chip, counted by walking its loops (chapter 03).

All counts are per (batch, head) and in bytes. Q, K, V, O and their gradients take ``bytes_per_element``
(e: 2 for fp16/bf16); the row statistics m, ℓ, L, D are float32 (4 bytes). N queries attend to N keys.

**Standard attention** runs one kernel per step; each reads its inputs from HBM and writes its output
back (``standard_passes`` lists them). Forward: S = τQKᵀ, P = softmax(S), O = PV — 4Nd + 4N² elements,
Θ(Nd + N²). The backward pass (dV, dP, dS, dQ, dK) moves 8Nd + 7N² more.

**FlashAttention** never writes S or P. Which blocks it re-reads depends on which loop is outside: the
outer block stays on chip while the whole inner loop streams past it, so inner tensors are read once
per outer block. With an on-chip memory (SRAM) of M elements:

- FlashAttention-1 (Dao et al. 2022, Algorithm 1): key/value blocks K_j, V_j outside (read once),
  query blocks inside: for each of the T_c = ⌈N/B_c⌉ key blocks it reads Q_i and the partial O_i,
  ℓ_i, m_i and writes them back. The paper takes B_c = ⌈M/4d⌉, B_r = min(B_c, d), so T_c ≈ 4Nd/M:
  e·Nd·(3T_c + 1) + 8N·(2T_c − 1) bytes ≈ 12·N²d²/M elements — Θ(N²d²/M).
- FlashAttention-2 (Dao 2023, Algorithm 1): query blocks outside (one program each: Q_i read once,
  O_i and L_i written once), key/value blocks inside, so K and V are read T_r = ⌈N/B_r⌉ times:
  e·Nd·(2 + 2T_r) + 4N bytes ≈ 2N²d/B_r elements. Its kernels pick B_r, B_c ∈ {64, 128} by tuning
  (§3.3), not by M: the traffic is Θ(N²d/B_r), and with B_r ≤ d it is at least 2N² — never more than
  2× below standard attention. It is Θ(N²d²/M) only if the outer query block grows as Θ(M/d)
  (``block_sizes(M, d, "fa2")``). In practice the re-reads of K_j, V_j hit the L2 cache, because the
  programs of one head run at the same time (chapter 09).

Lower bound (FlashAttention-1, Proposition 3): no algorithm computing exact attention achieves
o(N²d²/M) HBM accesses for all M in the range [d, Nd].

What one program must fit into on the chip, and how its loop is scheduled there, is
``flashcourse.gpumodel`` (chapters 04 and 09).
"""

import math
from typing import List, NamedTuple, Optional, Tuple

ORDERS = ("fa1", "fa2")
STAT_BYTES = 4  # m, ℓ, L, D are float32


class IOCount(NamedTuple):
    """Bytes read from and written to HBM."""

    reads: int
    writes: int

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __add__(self, other):
        return IOCount(self.reads + other.reads, self.writes + other.writes)

    def __mul__(self, factor: int):
        return IOCount(self.reads * factor, self.writes * factor)


class Pass(NamedTuple):
    """One kernel of standard attention: its name and the bytes it reads and writes."""

    name: str
    io: IOCount


# ----------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------


def block_sizes(M: int, d: int, order: str = "fa1") -> Tuple[int, int]:
    """(B_r, B_c) for an SRAM of M elements: the block kept on chip across the inner loop gets ⌈M/4d⌉
    rows, the streamed one min(⌈M/4d⌉, d) (so that the B_r × B_c tile of S fits too).

    ``"fa1"`` is FlashAttention-1's rule (keys outside): B_c = ⌈M/4d⌉, B_r = min(B_c, d).
    ``"fa2"`` is the same rule for queries outside: B_r = ⌈M/4d⌉, B_c = min(B_r, d).
    """
    _check_order(order)
    if M < 4 * d:
        raise ValueError(f"an SRAM of M={M} elements cannot hold one row each of Q, K, V and O at d={d}: need M >= 4d")
    outer = math.ceil(M / (4 * d))
    inner = min(outer, d)
    return (inner, outer) if order == "fa1" else (outer, inner)


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (FlashAttention-1 or -2 loop order), got {order!r}")


def _blocks(N: int, B: int) -> List[Tuple[int, int]]:
    """(start, rows) of each block of B rows; the last one may be shorter."""
    return [(start, min(B, N - start)) for start in range(0, N, B)]


def _visible(i0: int, rows: int, j0: int, causal: bool) -> bool:
    """Whether some query of block i (rows i0 .. i0 + rows − 1) sees key j0 (causal: j <= i)."""
    return not causal or j0 <= i0 + rows - 1


# ----------------------------------------------------------------------------------------------------
# Standard attention: one kernel per step
# ----------------------------------------------------------------------------------------------------


def standard_passes(N: int, d: int, *, backward: bool = False, mask: bool = False, dropout: bool = False,
                    bytes_per_element: int = 2) -> List[Pass]:
    """The kernels of standard attention, each reading its inputs and writing its output once.

    ``mask`` adds S + mask (an additive causal mask, read from cache: only S goes through HBM; its
    backward is the identity, no pass). ``dropout`` adds P_drop = dropout(P), which also writes a
    1-byte keep-mask, and its backward. The scale τ is folded into the matmuls (no pass of its own).
    ``backward`` lists the passes of the backward pass instead of the forward.
    """
    e, nn, nd = bytes_per_element, N * N, N * d
    P = "P_drop" if dropout else "P"

    def step(name, reads, writes):
        return Pass(name, IOCount(reads, writes))

    if not backward:
        passes = [step("S = τQKᵀ", 2 * nd * e, nn * e)]
        if mask:
            passes.append(step("S = S + mask", nn * e, nn * e))
        passes.append(step("P = softmax(S)", nn * e, nn * e))
        if dropout:
            passes.append(step("P_drop = dropout(P)", nn * e, nn * e + nn))
        passes.append(step(f"O = {P} V", (nn + nd) * e, nd * e))
        return passes
    dP = "dP_drop" if dropout else "dP"
    passes = [step(f"dV = {P}ᵀ dO", (nn + nd) * e, nd * e), step(f"{dP} = dO Vᵀ", 2 * nd * e, nn * e)]
    if dropout:
        passes.append(step("dP = dropout backward", nn * e + nn, nn * e))
    passes += [
        step("dS = P ∘ (dP − rowsum(dP ∘ P))", 2 * nn * e, nn * e),
        step("dQ = τ dS K", (nn + nd) * e, nd * e),
        step("dK = τ dSᵀ Q", (nn + nd) * e, nd * e),
    ]
    return passes


def standard_attention_io(N: int, d: int, *, backward: bool = False, mask: bool = False, dropout: bool = False,
                          bytes_per_element: int = 2) -> IOCount:
    """The sum of ``standard_passes``: HBM bytes of standard attention's forward (or backward) pass."""
    passes = standard_passes(N, d, backward=backward, mask=mask, dropout=dropout, bytes_per_element=bytes_per_element)
    return sum((p.io for p in passes), IOCount(0, 0))


def standard_closed_form(N: int, d: int, *, backward: bool = False, mask: bool = False, dropout: bool = False,
                         bytes_per_element: int = 2) -> int:
    """Total of ``standard_attention_io``. In elements of e bytes (the dropout keep-mask is 1 byte):

    forward  4Nd + 4N²  (+ 2N² with the mask pass, + 2N² and N² bytes with dropout)
    backward 8Nd + 7N²  (+ 2N² and N² bytes with dropout)
    """
    e, nn, nd = bytes_per_element, N * N, N * d
    if backward:
        return (8 * nd + 7 * nn) * e + (2 * nn * e + nn if dropout else 0)
    return (4 * nd + 4 * nn) * e + (2 * nn * e if mask else 0) + (2 * nn * e + nn if dropout else 0)


# ----------------------------------------------------------------------------------------------------
# FlashAttention: the loops, walked
# ----------------------------------------------------------------------------------------------------


def _keys_outside(N: int, d: int, B_r: int, B_c: int, causal: bool, e: int, visit, key_block_writes: int) -> IOCount:
    """Walk key blocks outside (K_j, V_j read once each) and query blocks inside.

    ``visit(rows, first)`` is the traffic of one (key block, query block) tile; ``first`` is True the
    first time a query block is met (nothing of it is in HBM yet). Each key block then writes
    ``key_block_writes`` elements per key row (dK_j, dV_j in the backward pass).
    """
    io, started = IOCount(0, 0), set()
    for j0, cols in _blocks(N, B_c):
        # K_j, V_j: read once
        io += IOCount(2 * cols * d * e, 0)
        for i0, rows in _blocks(N, B_r):
            if _visible(i0, rows, j0, causal):
                io += visit(rows, i0 not in started)
                started.add(i0)
        io += IOCount(0, key_block_writes * cols * d * e)
    return io


def fa1_forward_io(N: int, d: int, B_r: int, B_c: int, *, causal: bool = False, bytes_per_element: int = 2) -> IOCount:
    """FlashAttention-1's forward: key blocks outside, query blocks inside.

    The partial O_i, ℓ_i, m_i live in HBM between key blocks. The first key block a query block meets
    starts from the empty state (Algorithm 1 as written also zero-fills O, ℓ, m in HBM and reads
    them back: an implementation skips that).
    """
    e = bytes_per_element

    def visit(rows, first):
        # read Q_i and (after the first key block) the partial O_i, ℓ_i, m_i; write O_i, ℓ_i, m_i back
        partial = rows * d * e + 2 * rows * STAT_BYTES
        return IOCount(rows * d * e + (0 if first else partial), partial)

    return _keys_outside(N, d, B_r, B_c, causal, e, visit, key_block_writes=0)


def fa2_forward_io(N: int, d: int, B_r: int, B_c: int, *, causal: bool = False, bytes_per_element: int = 2) -> IOCount:
    """FlashAttention-2's forward: query blocks outside (one program each), key blocks inside."""
    e, io = bytes_per_element, IOCount(0, 0)
    for i0, rows in _blocks(N, B_r):
        # Q_i: read once
        io += IOCount(rows * d * e, 0)
        for j0, cols in _blocks(N, B_c):
            if _visible(i0, rows, j0, causal):
                # K_j, V_j: read again for every query block
                io += IOCount(2 * cols * d * e, 0)
        # O_i and L_i = m_i + log ℓ_i: written once
        io += IOCount(0, rows * d * e + rows * STAT_BYTES)
    return io


def fa1_backward_io(N: int, d: int, B_r: int, B_c: int, *, causal: bool = False, bytes_per_element: int = 2) -> IOCount:
    """FlashAttention-1's backward (its Algorithm 4): key blocks outside, dK_j, dV_j kept on chip;
    every query block reads Q_i, O_i, dO_i, ℓ_i, m_i and adds its share into dQ_i in HBM."""
    e = bytes_per_element

    def visit(rows, first):
        # Q_i, O_i, dO_i (D_i = rowsum(dO_i ∘ O_i) is recomputed here), ℓ_i, m_i;
        # dQ_i += dS_ij K_j: read (except the first time) and written back
        reads = 3 * rows * d * e + 2 * rows * STAT_BYTES + (0 if first else rows * d * e)
        return IOCount(reads, rows * d * e)

    return _keys_outside(N, d, B_r, B_c, causal, e, visit, key_block_writes=2)


def fa2_backward_io(N: int, d: int, B_r: int, B_c: int, *, causal: bool = False, bytes_per_element: int = 2) -> IOCount:
    """FlashAttention-2's backward (its Algorithm 2): D = rowsum(dO ∘ O) first, in a pass of its own;
    then key blocks outside, reading Q_i, dO_i, L_i, D_i and adding into dQ_i (atomic adds in HBM)."""
    e = bytes_per_element

    def visit(rows, first):
        # Q_i, dO_i, L_i, D_i; dQ_i += dS_ij K_j as an atomic add, which reads and writes dQ_i
        return IOCount(2 * rows * d * e + 2 * rows * STAT_BYTES + rows * d * e, rows * d * e)

    # D = rowsum(dO ∘ O): read O and dO, write D; dQ zero-filled for the atomic adds
    preprocess = IOCount(2 * N * d * e, N * STAT_BYTES + N * d * e)
    return preprocess + _keys_outside(N, d, B_r, B_c, causal, e, visit, key_block_writes=2)


_WALKS = {("fa1", False): fa1_forward_io, ("fa2", False): fa2_forward_io,
          ("fa1", True): fa1_backward_io, ("fa2", True): fa2_backward_io}


def flash_attention_io(N: int, d: int, M: Optional[int] = None, *, block_m: Optional[int] = None,
                       block_n: Optional[int] = None, order: str = "fa2", backward: bool = False,
                       causal: bool = False, bytes_per_element: int = 2) -> IOCount:
    """HBM bytes of FlashAttention's forward (or ``backward``) pass in the loop ``order`` "fa1" or "fa2".

    Give either the SRAM size ``M`` in elements (blocks from ``block_sizes(M, d, order)``) or
    ``block_m`` = B_r and ``block_n`` = B_c. With ``causal``, tiles above the diagonal are skipped.
    """
    _check_order(order)
    if M is not None:
        block_m, block_n = block_sizes(M, d, order)
    if block_m is None or block_n is None:
        raise ValueError("give the SRAM size M, or both block_m (B_r) and block_n (B_c)")
    return _WALKS[order, backward](N, d, block_m, block_n, causal=causal, bytes_per_element=bytes_per_element)


def flash_closed_form(N: int, d: int, M: Optional[int] = None, *, block_m: Optional[int] = None,
                      block_n: Optional[int] = None, order: str = "fa2", backward: bool = False,
                      bytes_per_element: int = 2) -> int:
    """Total of ``flash_attention_io`` without a causal mask, for any N (T_r = ⌈N/B_r⌉, T_c = ⌈N/B_c⌉):

    fa1 forward   e·Nd·(3T_c + 1) + 8N·(2T_c − 1)    K, V once; Q, O, ℓ, m once per key block
    fa2 forward   e·Nd·(2 + 2T_r) + 4N              Q, O, L once; K, V once per query block
    fa1 backward  e·Nd·(5T_c + 3) + 8N·T_c          K, V, dK, dV once; Q, O, dO, dQ, ℓ, m per key block
    fa2 backward  e·Nd·(4T_c + 7) + 4N·(2T_c + 1)   D first; Q, dO, L, D, dQ (read + write) per key block
    """
    _check_order(order)
    if M is not None:
        block_m, block_n = block_sizes(M, d, order)
    if block_m is None or block_n is None:
        raise ValueError("give the SRAM size M, or both block_m (B_r) and block_n (B_c)")
    e, nd = bytes_per_element, N * d
    T_r, T_c = math.ceil(N / block_m), math.ceil(N / block_n)
    if order == "fa1":
        if backward:
            return e * nd * (5 * T_c + 3) + 2 * STAT_BYTES * N * T_c
        return e * nd * (3 * T_c + 1) + 2 * STAT_BYTES * N * (2 * T_c - 1)
    if backward:
        return e * nd * (4 * T_c + 7) + STAT_BYTES * N * (2 * T_c + 1)
    return e * nd * (2 + 2 * T_r) + STAT_BYTES * N


def lower_bound_shape(N: int, d: int, M: int) -> float:
    """N²d²/M: the growth no exact attention algorithm can beat for all M in [d, Nd] (FA1, Prop. 3)."""
    return N * N * d * d / M


# ----------------------------------------------------------------------------------------------------
# The FlashAttention-1 paper's measurement, modelled
# ----------------------------------------------------------------------------------------------------


class PaperComparison(NamedTuple):
    """Modelled HBM bytes for all B·H heads (standard attention pass by pass), and the paper's measured GB."""

    standard_forward: List[Pass]
    standard_backward: List[Pass]
    flash_forward: IOCount
    flash_backward: IOCount
    measured_standard_gb: float
    measured_flash_gb: float

    @property
    def standard(self) -> int:
        return sum(p.io.total for p in self.standard_forward + self.standard_backward)

    @property
    def flash(self) -> int:
        return self.flash_forward.total + self.flash_backward.total

    @property
    def ratio(self) -> float:
        return self.standard / self.flash

    @property
    def measured_ratio(self) -> float:
        return self.measured_standard_gb / self.measured_flash_gb


# GPT-2 medium's attention in the FlashAttention-1 paper (Figure 2 and its table): A100, fp16,
# batch 64, 16 heads, N = 1024, d = 64, causal mask and dropout, forward + backward.
FA1_PAPER_SHAPE = dict(B=64, H=16, N=1024, d=64)
FA1_PAPER_MEASURED_GB = (40.3, 4.4)  # HBM reads + writes: standard attention, FlashAttention
# FlashAttention-1's CUDA kernels use key blocks of 256 at d = 64 (and N >= 256); by the paper's rule
# that is M = 4·d·B_c = 65,536 elements (128 KB of fp16, within the A100's 164 KB of shared memory).
FA1_PAPER_M = 4 * 64 * 256


def fa1_paper_comparison(*, causal_skip: bool = False) -> PaperComparison:
    """The FA1 paper's GPT-2 comparison, modelled (bytes for all B·H heads, forward + backward).

    Standard attention: the passes of a PyTorch baseline of the time (scale folded into the matmul, an
    additive causal mask, softmax, dropout, PV, and their backward) — ``standard_passes(mask=True,
    dropout=True)``. FlashAttention: FlashAttention-1's loop order with the paper's blocks for
    M = ``FA1_PAPER_M`` (B_c = 256, B_r = 64), forward and backward; the dropout mask is regenerated
    on chip. ``causal_skip`` also skips the tiles above the diagonal (the model's lower end).
    """
    B, H, N, d = (FA1_PAPER_SHAPE[k] for k in "BHNd")
    heads = B * H
    standard = [[Pass(p.name, p.io * heads) for p in standard_passes(N, d, backward=backward, mask=True, dropout=True)]
                for backward in (False, True)]
    flash = [flash_attention_io(N, d, FA1_PAPER_M, order="fa1", backward=backward, causal=causal_skip) * heads
             for backward in (False, True)]
    return PaperComparison(*standard, *flash, *FA1_PAPER_MEASURED_GB)

