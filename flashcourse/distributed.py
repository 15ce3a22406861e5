"""Exact attention over a sequence split across P processes (ranks): ring attention and Ulysses.

Each of the P ranks of a ``torch.distributed`` group holds N / P positions of one sequence: its shard
of Q, K and V, (B, H, N/P, d). Two ways to compute its rows of O = softmax(scale · Q Kᵀ) V:

* **Ring attention** (Liu et al., 2023). Q stays; the K/V shards travel around the ring of ranks
  r → r + 1, one hop per step. In P steps every rank has seen every K/V shard once. Each step runs the
  forward kernel on (own Q, visiting K/V) and gets a partial (O_b, L_b) that covers only those keys;
  chapter 02's ``merge_states`` folds it into the rank's running (O, L) exactly (``fold``). The next
  K/V transfer is posted *before* the step's kernel runs, so communication overlaps with compute.
  The backward sends K/V around again, with the dK/dV accumulators of each shard travelling beside
  it: every rank adds its share, and after P steps the accumulator is home, complete.
* **Ulysses** (DeepSpeed-Ulysses, Jacobs et al., 2023). One all-to-all turns "all heads, N/P
  positions" into "H/P heads, all N positions"; plain ``flash_attention`` runs on those heads; a
  second all-to-all turns the output back. Needs H and Hkv divisible by P.

Layouts (``shard``, ``unshard``): "contiguous" gives rank r the r-th of P equal chunks. Under a causal
mask that is unbalanced: rank 0's queries see only its own keys, rank P − 1's see everything.
"zigzag" cuts the sequence into 2P chunks and gives rank r chunks r and 2P − 1 − r (an early and a
late one), which makes every rank's work equal at every ring step (``ring_schedule``, ``step_work``).

Communication uses point-to-point ``batch_isend_irecv`` and ``all_to_all_single``, so it runs on
gloo (CPU tensors; CUDA tensors are staged through CPU memory) and on NCCL (GPUs). ``launch`` starts
P local processes joined in one group (tests, notebook, benchmark).
"""

import os
import tempfile
import time
from datetime import timedelta
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from ._checks import check_attention_inputs, check_flag, softmax_scale
from ._env import resolve_device
from .kernels.backward import attention_backward
from .kernels.forward import attention_forward
from .ops import KERNEL_DTYPES, flash_attention
from .softmax import SoftmaxState, finalize, merge_states

LAYOUTS = ("contiguous", "zigzag")

# NVLink multicast (NVLS) stays off in every process that may create an NCCL communicator
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ----------------------------------------------------------------------------------------------------
# Layouts: which positions of the sequence a rank holds
# ----------------------------------------------------------------------------------------------------


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the sequence is cut into: P (contiguous) or 2P (zigzag)."""
    return world_size * (2 if _check_layout(layout) == "zigzag" else 1)


def shard_chunks(rank: int, world_size: int, layout: str) -> tuple:
    """The chunks rank r holds, in order: (r,) contiguous, (r, 2P − 1 − r) zigzag."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if _check_layout(layout) == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def _check_divisible(N: int, world_size: int, layout: str) -> int:
    """The chunk length N / P (contiguous) or N / 2P (zigzag); a ValueError if it is not whole."""
    chunks = num_chunks(world_size, layout)
    if N % chunks:
        raise ValueError(
            f"the {layout} layout cuts the sequence into {chunks} equal chunks ({'2P' if chunks > world_size else 'P'} "
            f"for P = {world_size} ranks), but the length N = {N} is not divisible by {chunks}; pad the sequence "
            f"to a multiple of {chunks}" + (" or use layout='contiguous'" if layout == "zigzag" else "")
        )
    return N // chunks


def shard_positions(N: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """The positions (int64, N / P of them) of a length-N sequence that rank r holds, in its order.

    contiguous: [r·N/P, (r+1)·N/P). zigzag, with c = N / 2P: [r·c, (r+1)·c) then [(2P−1−r)·c, (2P−r)·c).
    """
    c = _check_divisible(N, world_size, layout)
    return torch.cat([torch.arange(j * c, (j + 1) * c) for j in shard_chunks(rank, world_size, layout)])


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """Rank r's shard of the full sequence x along ``dim`` (a copy): (B, H, N, d) -> (B, H, N/P, d)."""
    return x.index_select(dim, shard_positions(x.shape[dim], rank, world_size, layout).to(x.device))


def unshard(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full sequence from the P shards of ranks 0 … P − 1 (the inverse of ``shard``)."""
    P = len(shards)
    N = sum(s.shape[dim] for s in shards)
    held = torch.cat([shard_positions(N, r, P, layout) for r in range(P)])
    # position held[i] sits at index i of the concatenated shards; argsort puts them back in order
    return torch.cat(list(shards), dim=dim).index_select(dim, torch.argsort(held).to(shards[0].device))


# ----------------------------------------------------------------------------------------------------
# The ring step: fold a partial (O, L) in with merge_states
# ----------------------------------------------------------------------------------------------------


def _as_state(O: torch.Tensor, L: torch.Tensor) -> SoftmaxState:
    """A finalized (O, L) as a merge_states state: m = L, l = 1, o = O (l = 0 where L = −inf: no key)."""
    return SoftmaxState(L, torch.isfinite(L).to(L.dtype), O)


def fold(O: torch.Tensor, L: torch.Tensor, O_b: torch.Tensor, L_b: torch.Tensor):
    """The (O, L) of the union of two disjoint key sets from the (O, L) of each; float32.

    O (..., r, d), L (..., r). This is ``merge_states`` on finalized states: with m = max(L, L_b),
    α = e^(L − m) and β = e^(L_b − m), O_new = (α O + β O_b) / (α + β) and L_new = m + log(α + β).
    A row with L = −inf (it saw no key yet) takes the other side; two −inf rows stay (0, −inf).
    """
    merged = merge_states(_as_state(O.float(), L.float()), _as_state(O_b.float(), L_b.float()))
    return finalize(merged)


# ----------------------------------------------------------------------------------------------------
# The schedule: which blocks a rank computes at each ring step
# ----------------------------------------------------------------------------------------------------


class Block(NamedTuple):
    """One kernel call: the rank's query chunks [q0, q1) against the visiting key chunks [k0, k1)
    (indices into the chunks each shard holds, see ``shard_chunks``); ``causal`` for a diagonal block."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    def rows(self, c: int) -> slice:
        return slice(self.q0 * c, self.q1 * c)

    def cols(self, c: int) -> slice:
        return slice(self.k0 * c, self.k1 * c)

    def work(self) -> float:
        """Query-key pairs computed, in chunk² units (a causal square computes about half)."""
        area = (self.q1 - self.q0) * (self.k1 - self.k0)
        return area / 2 if self.causal else area


def _join(a: Block, b: Block) -> Optional[Block]:
    """One full block covering the full blocks a and b, if together they form a rectangle."""
    if a.causal or b.causal:
        return None
    if (a.q0, a.q1) == (b.q0, b.q1) and a.k1 == b.k0:
        return Block(a.q0, a.q1, a.k0, b.k1, False)
    if (a.k0, a.k1) == (b.k0, b.k1) and a.q1 == b.q0:
        return Block(a.q0, b.q1, a.k0, a.k1, False)
    return None


def _merge_blocks(blocks: List[Block]) -> List[Block]:
    """Fewer kernel calls: neighbouring full blocks (in sorted order) that form a rectangle become one."""
    merged = []
    for blk in sorted(blocks):
        joined = _join(merged[-1], blk) if merged else None
        if joined is None:
            merged.append(blk)
        else:
            merged[-1] = joined
    return merged


def ring_schedule(rank: int, world_size: int, layout: str = "zigzag", causal: bool = True) -> List[List[Block]]:
    """For each ring step s = 0 … P − 1, the kernel calls of ``rank``, which then holds the K/V shard of
    rank (r − s) mod P.

    Without a mask every step is one full block. With the causal mask, a block (query chunk a, key
    chunk b) is full when b < a, diagonal when b == a (causal kernel) and skipped when b > a. At step 0
    a rank meets its own keys: its chunks are in increasing order, so one causal call on the whole
    shard is exact (in zigzag, the late chunk 2P − 1 − r sees all of the early chunk r).
    Contiguous: rank r computes a full block at steps 1 … r and idles at the other P − 1 − r.
    Zigzag, at step s > 0 from source rank t: if t < r, both of r's chunks see t's early chunk (and
    not its late one): 2 chunk² of work; if t > r, r's late chunk sees both of t's chunks (its early
    chunk sees none): 2 chunk² again. Every rank does the same work at every step: the ring's
    lock-step waits for nobody.
    """
    mine = shard_chunks(rank, world_size, layout)
    steps = []
    for s in range(world_size):
        theirs = shard_chunks((rank - s) % world_size, world_size, layout)
        if not causal or s == 0:
            steps.append([Block(0, len(mine), 0, len(theirs), causal)])
            continue
        # chunks of different ranks never coincide, so b < a (full) or b > a (skipped)
        full = [Block(i, i + 1, j, j + 1, False) for i, a in enumerate(mine) for j, b in enumerate(theirs) if b < a]
        steps.append(_merge_blocks(full))
    return steps


def step_work(world_size: int, layout: str = "zigzag", causal: bool = True) -> torch.Tensor:
    """(P ranks, P steps): query-key pairs each rank computes at each ring step, in units of (N/P)².

    A step lasts as long as its busiest rank, so Σ_s max_r work[r, s] models the ring's time.
    """
    unit = (num_chunks(world_size, layout) // world_size) ** 2  # chunk² per (N/P)²
    return torch.tensor([[sum(b.work() for b in blocks) / unit for blocks in ring_schedule(r, world_size, layout, causal)]
                         for r in range(world_size)])


# ----------------------------------------------------------------------------------------------------
# Communication
# ----------------------------------------------------------------------------------------------------


def _group_info(group):
    """(this rank in the group, group size, global rank of a group rank)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return rank, size, (lambda r: r if group is None else dist.get_global_rank(group, r))


def _staged(t: torch.Tensor, group) -> bool:
    """gloo moves CPU memory only: a CUDA tensor sent over gloo goes through a CPU copy."""
    return t.device.type != "cpu" and "nccl" not in str(dist.get_backend(group))


class Transfer:
    """Tensors in flight around the ring; ``wait()`` returns the ones received, on the senders' device."""

    def __init__(self, works, sent, received, device):
        self.works, self.sent, self.received, self.device = works, sent, received, device

    def wait(self) -> List[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.sent = None  # the send buffers may be freed now
        return [t.to(self.device) for t in self.received]


def ring_send_recv(tensors: Sequence[torch.Tensor], group=None, tag: int = 0) -> Transfer:
    """Post: send ``tensors`` to rank r + 1 and receive as many, of the same shapes, from rank r − 1
    (mod P); returns at once. One rank alone receives its own tensors."""
    rank, P, global_rank = _group_info(group)
    device = tensors[0].device
    if P == 1:
        return Transfer([], None, list(tensors), device)
    wire = [(t.detach().to("cpu") if _staged(t, group) else t.detach()).contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in wire]
    to, frm = global_rank((rank + 1) % P), global_rank((rank - 1) % P)
    ops = [dist.P2POp(dist.isend, t, to, group, tag) for t in wire]
    ops += [dist.P2POp(dist.irecv, t, frm, group, tag) for t in received]
    return Transfer(dist.batch_isend_irecv(ops), wire, received, device)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x (P, ...): slot j goes to rank j; slot i of the result came from rank i."""
    wire = (x.detach().to("cpu") if _staged(x, group) else x.detach()).contiguous()
    out = torch.empty_like(wire)
    dist.all_to_all_single(out, wire, group=group)
    return out.to(x.device)


class _AllToAll(torch.autograd.Function):
    """``_all_to_all`` with autograd: the exchange is its own adjoint (slot i goes back to rank i)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


# ----------------------------------------------------------------------------------------------------
# Ring attention
# ----------------------------------------------------------------------------------------------------

_KV_TAG, _GRAD_TAG = 1, 2


def _chunk_length(q: torch.Tensor, world_size: int, layout: str) -> int:
    return q.shape[2] // (num_chunks(world_size, layout) // world_size)


def _fold_step(q, K_j, V_j, O, L, blocks, c, scale):
    """Run one ring step's kernel calls on the visiting K_j, V_j and fold each partial (O_b, L_b) into
    the rows of (O, L) it covers, in place."""
    for blk in blocks:
        rows, cols = blk.rows(c), blk.cols(c)
        O_b, L_b = attention_forward(q[:, :, rows], K_j[:, :, cols], V_j[:, :, cols], causal=blk.causal, scale=scale)
        O[:, :, rows], L[:, :, rows] = fold(O[:, :, rows], L[:, :, rows], O_b, L_b)


def _empty_output(q):
    """(O, L) of rows that have seen no key yet: O = 0 (float32), L = −inf."""
    O = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return O, torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)


def _ring_forward(q, k, v, causal, scale, group, layout, communicate):
    """(O, L) of this rank's queries against the whole sequence; O in q's dtype, L float32."""
    rank, P, _ = _group_info(group)
    c = _chunk_length(q, P, layout)
    O, L = _empty_output(q)
    K_j, V_j = k, v
    for s, blocks in enumerate(ring_schedule(rank, P, layout, causal)):
        # post the next hop first: the transfer overlaps with this step's kernels
        transfer = ring_send_recv([K_j, V_j], group, _KV_TAG) if communicate and s < P - 1 else None
        _fold_step(q, K_j, V_j, O, L, blocks, c, scale)
        if transfer is not None:
            K_j, V_j = transfer.wait()
    return O.to(q.dtype), L


def simulate_ring_forward(q, k, v, world_size: int, *, causal: bool = False, scale: Optional[float] = None,
                          layout: str = "zigzag"):
    """The ring's forward for all P ranks in one process, without communication: (O, L) of the whole
    sequence, O in q's dtype, L float32.

    q (B, H, N, d), k, v (B, Hkv, N, d) are the full sequence; rank r's step s folds in the K/V shard of
    rank (r − s) mod P, exactly what the ring delivers. For teaching and grading without processes.
    """
    shapes = _check_shards(q, k, v, "simulate_ring_forward")
    scale = softmax_scale(scale, shapes.d)
    shards = [[shard(t, r, world_size, layout) for r in range(world_size)] for t in (q, k, v)]
    out = []
    for r, q_r in enumerate(shards[0]):
        c = _chunk_length(q_r, world_size, layout)
        O, L = _empty_output(q_r)
        for s, blocks in enumerate(ring_schedule(r, world_size, layout, causal)):
            src = (r - s) % world_size
            _fold_step(q_r, shards[1][src], shards[2][src], O, L, blocks, c, scale)
        out.append((O.to(q.dtype), L))
    return unshard([o for o, _ in out], layout), unshard([L[..., None] for _, L in out], layout)[..., 0]


def _ring_backward(q, k, v, o, L, dO, causal, scale, group, layout, communicate):
    """(dq, dk, dv) of this rank's shards. K/V go around the ring again; the dK/dV accumulator of each
    K/V shard travels one step behind it, collecting every rank's share, and arrives home last."""
    rank, P, _ = _group_info(group)
    c = _chunk_length(q, P, layout)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    K_j, V_j = k, v
    grads = None  # the accumulators (dK_j, dV_j) in flight from rank r − 1
    for s, blocks in enumerate(ring_schedule(rank, P, layout, causal)):
        transfer = ring_send_recv([K_j, V_j], group, _KV_TAG) if communicate and s < P - 1 else None
        dK_j = torch.zeros(K_j.shape, dtype=torch.float32, device=q.device)
        dV_j = torch.zeros_like(dK_j)
        for blk in blocks:
            rows, cols = blk.rows(c), blk.cols(c)
            # P = exp(S − L) with the GLOBAL L, and D = rowsum(dO ∘ O) with the final O: the block's
            # share of the exact gradients
            dq_b, dk_b, dv_b = attention_backward(
                q[:, :, rows], K_j[:, :, cols], V_j[:, :, cols], o[:, :, rows], L[:, :, rows], dO[:, :, rows],
                causal=blk.causal, scale=scale,
            )
            dq[:, :, rows] += dq_b
            dK_j[:, :, cols] += dk_b
            dV_j[:, :, cols] += dv_b
        if grads is not None:
            # the shares of the ranks that held this K/V shard before
            dK_prev, dV_prev = grads.wait()
            dK_j += dK_prev
            dV_j += dV_prev
        if communicate:
            grads = ring_send_recv([dK_j, dV_j], group, _GRAD_TAG)
        else:
            grads = Transfer([], None, [dK_j, dV_j], q.device)  # kept home
        if transfer is not None:
            K_j, V_j = transfer.wait()
    # one last hop: rank r receives the complete dK/dV of its own shard from rank r − 1
    dk, dv = grads.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, layout, communicate):
        o, L = _ring_forward(q, k, v, causal, scale, group, layout, communicate)
        ctx.save_for_backward(q, k, v, o, L)
        ctx.args = (causal, scale, group, layout, communicate)
        return o

    @staticmethod
    def backward(ctx, dO):
        q, k, v, o, L = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, o, L, dO, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _check_shards(q, k, v, name: str):
    """The local shards of one sequence in a kernel dtype; returns their sizes."""
    shapes = check_attention_inputs(q, k, v)
    if shapes.Nk != shapes.Nq:
        raise ValueError(
            f"{name} shards one sequence: k and v must hold as many positions as q, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} runs float16, bfloat16 and float32 tensors, got {q.dtype}")
    return shapes


def ring_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, group=None,
                   layout: str = "zigzag", communicate: bool = True):
    """This rank's rows of softmax(scale · Q Kᵀ) V over the whole sequence, by passing K/V around a ring.

    q (B, H, N/P, d), k, v (B, Hkv, N/P, d) with H % Hkv == 0: this rank's shards, in ``layout``
    ("zigzag" or "contiguous", see ``shard``), of a length-N sequence split over the P ranks of
    ``group`` (default: the whole world). Returns O (B, H, N/P, d) in q's dtype, in the same layout;
    differentiable in q, k, v. Every rank of the group must call it with the same arguments.
    ``communicate=False`` skips every transfer and reuses the local K/V at each step: the same kernel
    work with wrong results, to measure what communication adds to the time.
    """
    shapes = _check_shards(q, k, v, "ring_attention")
    _, P, _ = _group_info(group)
    _check_divisible(shapes.Nq * P, P, layout)
    causal = check_flag("causal", causal)
    return _RingAttention.apply(q, k, v, causal, softmax_scale(scale, shapes.d), group, layout, communicate)


# ----------------------------------------------------------------------------------------------------
# Ulysses: all-to-all over heads
# ----------------------------------------------------------------------------------------------------


def _heads_from_sequence(x, P, group, communicate):
    """(B, h, N/P, d) sequence shard -> (B, h/P, N, d): rank j gets heads [j·h/P, (j+1)·h/P), all positions."""
    B, h, n, d = x.shape
    # slot j of (P, B, h/P, n, d) holds head group j
    x = x.reshape(B, P, h // P, n, d).transpose(0, 1)
    # after the exchange, slot i holds rank i's positions (the i-th contiguous chunk)
    x = _AllToAll.apply(x, group) if communicate else x
    return x.permute(1, 2, 0, 3, 4).reshape(B, h // P, P * n, d)


def _sequence_from_heads(y, P, group, communicate):
    """(B, h/P, N, d) -> (B, h, N/P, d), the inverse of ``_heads_from_sequence``."""
    B, hp, N, d = y.shape
    # slot j of (P, B, h/P, N/P, d) holds sequence chunk j
    y = y.reshape(B, hp, P, N // P, d).permute(2, 0, 1, 3, 4)
    # after the exchange, slot i holds head group i
    y = _AllToAll.apply(y, group) if communicate else y
    return y.transpose(0, 1).reshape(B, P * hp, N // P, d)


def ulysses_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, group=None,
                      communicate: bool = True):
    """This rank's rows of softmax(scale · Q Kᵀ) V, by exchanging heads for positions (all-to-all).

    q (B, H, N/P, d), k, v (B, Hkv, N/P, d): this rank's contiguous shards (``shard(x, r, P,
    "contiguous")``); H and Hkv must be divisible by P. Returns O (B, H, N/P, d); differentiable.
    ``communicate=False`` skips the exchanges (same kernel work, wrong results; for timing).
    """
    shapes = _check_shards(q, k, v, "ulysses_attention")
    _, P, _ = _group_info(group)
    if shapes.H % P or shapes.Hkv % P:
        raise ValueError(
            f"ulysses_attention gives each of the P = {P} ranks H/P query heads and Hkv/P key/value heads, "
            f"but H = {shapes.H}, Hkv = {shapes.Hkv} are not both divisible by {P}; use ring_attention, "
            f"which splits positions instead"
        )
    causal = check_flag("causal", causal)
    qh, kh, vh = (_heads_from_sequence(t, P, group, communicate) for t in (q, k, v))
    o = flash_attention(qh, kh, vh, causal=causal, scale=scale)
    return _sequence_from_heads(o, P, group, communicate)


# ----------------------------------------------------------------------------------------------------
# What each strategy sends, and when overlap hides it
# ----------------------------------------------------------------------------------------------------


class Traffic(NamedTuple):
    """Bytes one rank sends: ``rounds`` exchanges of ``bytes_per_round`` each (``total`` in all)."""

    rounds: int
    bytes_per_round: float
    total: float


def communication_bytes(strategy: str, *, N: int, world_size: int, H: int, d: int, Hkv: Optional[int] = None,
                        B: int = 1, element_size: int = 2, backward: bool = False) -> Traffic:
    """What one rank sends in one forward (or, with ``backward``, one backward) pass.

    ring: P − 1 rounds of its visiting K and V shards, 2·B·Hkv·(N/P)·d elements each round, each
    round hidden behind a step of compute if the link is fast enough. Its backward sends K/V again
    (P − 1 rounds) and the float32 dK/dV accumulators (P rounds), counted as P rounds.
    ulysses: all-to-alls that keep 1/P of each tensor home and send (P − 1)/P of it: q, k, v before
    the attention and O after it (backward: dO before, dq, dk, dv after), as 2 rounds that nothing
    overlaps.
    """
    Hkv = H if Hkv is None else Hkv
    n = N // world_size
    P = world_size
    if strategy == "ring":
        kv = 2 * B * Hkv * n * d
        total = kv * element_size * (P - 1) + (kv * 4 * P if backward else 0)
        rounds = P if backward else P - 1
    elif strategy == "ulysses":
        total = B * n * d * (2 * H + 2 * Hkv) * element_size * (P - 1) / P
        rounds = 2
    else:
        raise ValueError(f"strategy must be 'ring' or 'ulysses', got {strategy!r}")
    return Traffic(rounds, total / max(rounds, 1), total)


def ring_step_times(n: int, *, H: int, d: int, Hkv: Optional[int] = None, B: int = 1, causal: bool = True,
                    element_size: int = 2, flops_per_s: float, bytes_per_s: float):
    """(compute seconds, transfer seconds) of one forward ring step on a shard of n positions.

    compute: 4·B·H·n²·d FLOPs (two matmuls of n × n × d), half of it under a balanced causal mask;
    transfer: the K and V shards, 2·B·Hkv·n·d elements over a link of ``bytes_per_s``. Compute grows as
    n², transfer as n, so overlap hides the transfer once n ≥ ``overlap_crossover``.
    """
    Hkv = H if Hkv is None else Hkv
    flops = 4 * B * H * n * n * d * (0.5 if causal else 1.0)
    return flops / flops_per_s, 2 * B * Hkv * n * d * element_size / bytes_per_s


def overlap_crossover(*, H: int, Hkv: Optional[int] = None, causal: bool = True, element_size: int = 2,
                      flops_per_s: float, bytes_per_s: float) -> float:
    """The shard length n = N/P above which a ring step's compute outlasts its K/V transfer.

    From 4·H·n²·d·f / F = 2·Hkv·n·d·e / W (f = 1/2 causal, 1 full): n = Hkv·e·F / (2·f·H·W).
    The head dim d cancels: both sides are linear in it.
    """
    Hkv = H if Hkv is None else Hkv
    f = 0.5 if causal else 1.0
    return Hkv * element_size * flops_per_s / (2 * f * H * bytes_per_s)


def example_rank(rank: int, world_size: int, q, k, v, dO, causal: bool = True) -> dict:
    """One rank's part of chapter 11's demonstration: ring attention in both layouts and Ulysses on this
    rank's shards of the whole sequence (q, k, v), forward and backward with dO.

    The shards compute where the kernels run (``resolve_device``: this rank's GPU under NCCL, else the GPU
    when there is one, else the CPU). Returns {"ring-zigzag" | "ring-contiguous" | "ulysses": [O, dQ, dK,
    dV]}, this rank's shards on the CPU.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else resolve_device(None)
    out = {}
    for name in ("ring-zigzag", "ring-contiguous", "ulysses"):
        layout = "zigzag" if name == "ring-zigzag" else "contiguous"
        q_r, k_r, v_r = (shard(t, rank, world_size, layout).to(device).requires_grad_() for t in (q, k, v))
        if name == "ulysses":
            o = ulysses_attention(q_r, k_r, v_r, causal=causal)
        else:
            o = ring_attention(q_r, k_r, v_r, causal=causal, layout=layout)
        o.backward(shard(dO, rank, world_size, layout).to(device))
        out[name] = [t.detach().cpu() for t in (o, q_r.grad, k_r.grad, v_r.grad)]
    return out


# ----------------------------------------------------------------------------------------------------
# Starting P local processes
# ----------------------------------------------------------------------------------------------------


def _rank_main(rank, fn, world_size, args, backend, folder, timeout):
    os.environ.update(NO_MULTICAST)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in one process group
    (``backend`` "gloo" or "nccl", one GPU per rank); return what each returned, by rank.

    ``fn`` must be importable (defined in a module, not in a notebook cell) and return picklable data.
    A rank that raises makes ``launch`` raise its error; if they are not all done after ``timeout``
    seconds they are stopped and ``TimeoutError`` is raised. NVLink multicast is off in every rank.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        os.environ.update(NO_MULTICAST)  # the children inherit it too
        context = mp.start_processes(_rank_main, args=(fn, world_size, args, backend, folder, timeout),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.terminate()
                raise TimeoutError(f"the {world_size} ranks running {fn.__name__} did not finish in {timeout:.0f} s")
        return [torch.load(os.path.join(folder, f"{r}.pt"), weights_only=False) for r in range(world_size)]
