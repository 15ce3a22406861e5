"""What one program of the attention kernel asks of an SM, and how its key loop is scheduled
(chapters 04 and 09).

**The chip** (``GPU``, ``H100_SXM``): a GPU is an array of streaming multiprocessors (SMs). Each
program of a Triton grid (CUDA's thread block, or CTA) runs on one SM from start to end, as
``num_warps`` warps of 32 threads; an SM holds several programs at once if their shared memory,
registers and threads fit together.

**The budget of one forward program** (chapter 04): shared memory holds Q_i and ``num_stages``
buffers each of K_j and V_j, e·d·(B_r + 2·stages·B_c) bytes (``forward_shared_bytes``); registers
hold the float32 tiles O_i (B_r × d) and S_ij (B_r × B_c), at least B_r·(d + B_c) / (32·warps) a
thread (``tile_registers``). ``kernel_budget`` says how many such programs one SM holds.

**The schedule of the key loop** (chapter 09): three units work in parallel — the loads (TMA or
cp.async), the tensor cores (QKᵀ, PV) and the exp unit (the softmax's exponentials, on the
special-function units). ``pipeline_schedule`` runs one program's loop on them: one stage (each load
waits for the math), several stages (software pipelining), the next block's QKᵀ issued before this
block's PV (FlashAttention-3's intra-warpgroup overlap), or two warpgroups taking turns (its ping-pong).
``exp_to_matmul_time`` gives the exponentials' share at the units' peak rates.

These are models: lower bounds and schedules at peak rates. The compiler's own counts (``n_regs``,
``n_spills`` of a compiled kernel) and a profiler are the measurement.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

KiB = 1024


class GPU(NamedTuple):
    """The numbers of one GPU that the course reasons with (vendor spec sheet and tuning guide)."""

    name: str
    sms: int  # streaming multiprocessors; one program (CTA) runs on one SM
    matmul_tflops: float  # dense fp16/bf16 tensor-core throughput, 10¹² FLOP/s
    exp_tops: float  # exponentials (special-function units), 10¹² per second
    bandwidth_tbs: float  # HBM bandwidth, 10¹² bytes/s
    registers_per_sm: int  # 32-bit registers, shared by the programs an SM holds
    max_registers_per_thread: int  # beyond this the compiler spills to local memory (off chip, cached)
    max_threads_per_sm: int
    shared_per_sm: int  # bytes of shared memory, shared by the programs an SM holds
    shared_per_program: int  # the most one program may allocate
    reserved_shared_per_program: int  # taken by the system for every program on an SM


# H100 SXM5: 132 SMs × 4096 fp16 FLOP/clock × 1.83 GHz ≈ 989 TFLOP/s; 132 SMs × 16 exp/clock × 1.83 GHz
# ≈ 3.9 T exp/s (the FlashAttention-3 paper's numbers); 64 Ki registers and 228 KiB of shared memory per
# SM, of which one program may take 227 KiB and 1 KiB a program is reserved (Hopper tuning guide).
H100_SXM = GPU("H100 SXM", sms=132, matmul_tflops=989.0, exp_tops=3.9, bandwidth_tbs=3.35,
               registers_per_sm=65536, max_registers_per_thread=255, max_threads_per_sm=2048,
               shared_per_sm=228 * KiB, shared_per_program=227 * KiB, reserved_shared_per_program=1 * KiB)


# ----------------------------------------------------------------------------------------------------
# The budget of one program (chapter 04)
# ----------------------------------------------------------------------------------------------------


def shared_bytes(resident_rows: int, streamed_rows: int, d: int, num_stages: int, bytes_per_element: int = 2) -> int:
    """Shared memory of a program that keeps ``resident_rows`` rows of d elements for its whole loop and
    streams ``streamed_rows`` rows per step, with ``num_stages`` buffers of those in flight.

    Forward: Q_i resident (B_r rows), K_j and V_j streamed (2·B_c rows): ``forward_shared_bytes``.
    (Triton may add a little for barriers and reductions: the kernel's own count is the measurement.)
    """
    # e · d · (resident + stages · streamed)
    return bytes_per_element * d * (resident_rows + num_stages * streamed_rows)


def forward_shared_bytes(block_m: int, block_n: int, d: int, num_stages: int, bytes_per_element: int = 2) -> int:
    """Shared memory of one forward program: Q_i, and ``num_stages`` buffers each of K_j and V_j.

    e·d·(B_r + 2·stages·B_c); d is the head dim as the kernel pads it (BLOCK_D).
    """
    return shared_bytes(block_m, 2 * block_n, d, num_stages, bytes_per_element)


def tile_registers(block_m: int, block_n: int, d: int, num_warps: int) -> int:
    """32-bit registers a thread needs at least for the float32 tiles of a forward program: the
    accumulator O_i (B_r × d) and the scores S_ij (B_r × B_c), spread over 32·num_warps threads.
    Addresses, m_i, ℓ_i, the fp16 copy of P_ij and temporaries come on top."""
    # B_r · (d + B_c) / (32 · warps)
    return math.ceil(block_m * (d + block_n) / (32 * num_warps))


class Budget(NamedTuple):
    """What one program asks of an SM, and how many such programs one SM holds at once."""

    shared_bytes: int  # Q_i + num_stages · (K_j + V_j)
    registers: int  # per thread: the tiles' lower bound, or the compiler's count when given
    spills: bool  # more registers a thread than the GPU gives one: the rest live in local memory
    by_shared: int  # programs per SM that shared memory allows (0: over one program's limit, no launch)
    by_registers: int  # programs per SM that the register file allows
    by_threads: int  # programs per SM that the thread limit allows

    @property
    def programs_per_sm(self) -> int:
        """The tightest of the three (0: the configuration does not launch)."""
        return min(self.by_shared, self.by_registers, self.by_threads)


def kernel_budget(block_m: int, block_n: int, num_warps: int, num_stages: int, *, d: int, bytes_per_element: int = 2,
                  registers: Optional[int] = None, gpu: GPU = H100_SXM) -> Budget:
    """The shared-memory, register and thread budget of one forward program (B_r = block_m, B_c = block_n).

    ``registers``: a thread's count as the compiler reports it (``n_regs``); by default the lower
    bound ``tile_registers``. A thread never holds more than ``gpu.max_registers_per_thread``: the
    compiler spills the rest (``Budget.spills``).
    """
    shared = forward_shared_bytes(block_m, block_n, d, num_stages, bytes_per_element)
    registers = tile_registers(block_m, block_n, d, num_warps) if registers is None else registers
    threads = 32 * num_warps
    # every program also takes the system's reserved shared memory
    by_shared = 0 if shared > gpu.shared_per_program else gpu.shared_per_sm // (shared + gpu.reserved_shared_per_program)
    spills = registers > gpu.max_registers_per_thread
    by_registers = gpu.registers_per_sm // (threads * min(registers, gpu.max_registers_per_thread))
    return Budget(shared, registers, spills, by_shared, by_registers, gpu.max_threads_per_sm // threads)


# ----------------------------------------------------------------------------------------------------
# The schedule of the key loop (chapter 09)
# ----------------------------------------------------------------------------------------------------


def exp_to_matmul_time(d: int, gpu: GPU = H100_SXM) -> float:
    """Time of a tile's exponentials over the time of its two matmuls, each unit at its peak rate.

    Each score S_ij costs 4d matmul FLOPs (2d in Q_i K_jᵀ, 2d in P_ij V_j) and one exp.
    On an H100: ≈ 1.0 at d = 64, 0.5 at d = 128.
    """
    # (1 / exp rate) / (4d / matmul rate)
    return (1 / gpu.exp_tops) / (4 * d / gpu.matmul_tflops)


UNITS = ("loads", "tensor cores", "exp unit")


class Event(NamedTuple):
    """One operation of a pipeline schedule: on which unit, for which key block and warpgroup, when."""

    unit: str  # one of UNITS
    op: str  # "K_j, V_j", "QKᵀ", "exp", "PV"
    block: int  # the key block j
    warpgroup: int
    start: float
    end: float


class _Op(NamedTuple):
    unit: str
    op: str
    block: int
    warpgroup: int
    duration: float
    after: Tuple[Tuple[str, int, int], ...]  # (op, block, warpgroup) that must end first


def _key_loop(n_blocks: int, load: float, matmul: float, exp: float, stages: int, overlap_softmax: bool,
              warpgroups: int) -> List[List[_Op]]:
    """The queues of operations, each run in order: the loads, and per warpgroup its tensor-core and
    its exp operations, in the order the program issues them."""
    w_all = range(warpgroups)
    # block j's buffer is free again once every warpgroup has finished its PV with block j − stages
    loads = [_Op("loads", "K_j, V_j", j, 0, load, tuple(("PV", j - stages, w) for w in w_all if j >= stages))
             for j in range(n_blocks)]
    queues = [loads]
    for w in w_all:
        # each warpgroup holds B_r / warpgroups rows of the query block: its share of the work
        qk = [_Op("tensor cores", "QKᵀ", j, w, matmul / 2 / warpgroups, (("K_j, V_j", j, 0),)) for j in range(n_blocks)]
        pv = [_Op("tensor cores", "PV", j, w, matmul / 2 / warpgroups, (("exp", j, w),)) for j in range(n_blocks)]
        tensor = qk[:1] if overlap_softmax else []
        for j in range(n_blocks):
            if overlap_softmax:  # QKᵀ of block j + 1 is issued before PV of block j
                tensor += qk[j + 1:j + 2] + [pv[j]]
            else:
                tensor += [qk[j], pv[j]]
        queues += [tensor, [_Op("exp unit", "exp", j, w, exp / warpgroups, (("QKᵀ", j, w),)) for j in range(n_blocks)]]
    return queues


def pipeline_schedule(n_blocks: int, load: float, matmul: float, exp: float, *, stages: int,
                      overlap_softmax: bool = False, warpgroups: int = 1) -> List[Event]:
    """Schedule one program's key loop over ``n_blocks`` key blocks on three units that run in
    parallel, each one operation at a time: the loads, the tensor cores and the exp unit.

    Block j: load K_j, V_j (``load``), S_ij = Q_i K_jᵀ (``matmul``/2), exp (``exp``), O_i += P_ij V_j
    (``matmul``/2), where ``matmul`` and ``exp`` are the times of one B_r-row tile.

    ``stages`` buffers for K_j, V_j: the load of block j waits until block j − stages has finished
    its PV (1 buffer: nothing overlaps; more: software pipelining, loads run ahead).
    ``overlap_softmax`` issues QKᵀ of block j + 1 before PV of block j, so that block j + 1's
    exponentials run under that PV (FlashAttention-3's intra-warpgroup overlap).
    ``warpgroups`` split the B_r rows; with 2, each warpgroup has half of every operation and they
    take turns at the units — one's exponentials under the other's matmuls (FlashAttention-3's ping-pong).
    A unit that two operations wait for takes the one that can start first, on a tie the warpgroup
    that is behind.
    """
    if overlap_softmax and stages < 2:
        raise ValueError("overlapping the softmax needs K_{j+1} loaded during block j: stages >= 2")
    if warpgroups < 1 or n_blocks < 1 or stages < 1:
        raise ValueError(f"need n_blocks, stages and warpgroups >= 1, got {n_blocks}, {stages}, {warpgroups}")
    queues = _key_loop(n_blocks, load, matmul, exp, stages, overlap_softmax, warpgroups)
    done: Dict[Tuple[str, int, int], float] = {}
    free = {unit: 0.0 for unit in UNITS}
    issued = [0] * len(queues)
    progress = [0] * warpgroups  # operations of each warpgroup scheduled so far
    events: List[Event] = []
    while any(i < len(q) for i, q in zip(issued, queues)):
        # the next operation of each queue whose inputs are done: (start, its warpgroup's progress, queue)
        ready = []
        for k, q in enumerate(queues):
            op = q[issued[k]] if issued[k] < len(q) else None
            if op is not None and all(a in done for a in op.after):
                start = max([free[op.unit]] + [done[a] for a in op.after])
                ready.append((start, 0 if op.unit == "loads" else progress[op.warpgroup], k))
        start, _, k = min(ready)  # the earliest; on a tie, the warpgroup that is behind
        op = queues[k][issued[k]]
        issued[k] += 1
        progress[op.warpgroup] += op.unit != "loads"
        end = free[op.unit] = done[op.op, op.block, op.warpgroup] = start + op.duration
        events.append(Event(op.unit, op.op, op.block, op.warpgroup, start, end))
    return events
