"""How a number is made: time, peak memory, FLOPs and bytes of one attention call.

``time_ms`` and ``peak_memory`` are the course's only timing and memory helpers: the benchmark uses
them, and so do the notebooks (``flashcourse.viz.peak_memory`` is ``peak_memory``).
"""

import statistics
import time
from typing import Callable, Dict, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .._env import resolve_device

# FLOPs of a mode in units of the forward pass: the backward pass runs five N×N×d products to the
# forward's two, so 2.5 forwards; forward + backward is 3.5.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# tensors of (B, H, N, d) a mode must hold at least: q, k, v, o, and for a backward dO, dq, dk, dv
MODE_IO_TENSORS = {"fwd": 4, "bwd": 8, "fwd+bwd": 8}
CPU_THREADS = 1  # torch threads while timing on the CPU: the same on every machine, whatever its load
CPU_MIN_RUNS = 10  # timed calls on the CPU, at least


def attention_flops(B: int, H: int, N: int, d: int, causal: bool, mode: str = "fwd") -> float:
    """FLOPs of one call: 4·B·H·N²·d for the forward (QKᵀ and PV), halved when causal, ×2.5 for bwd."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {tuple(MODE_FLOP_FACTOR)}, got {mode!r}")
    # 2 products × 2 FLOPs per multiply-add × B·H·N·N·d
    flops = 4.0 * B * H * N * N * d
    return flops * (0.5 if causal else 1.0) * MODE_FLOP_FACTOR[mode]


def io_bytes(B: int, H: int, N: int, d: int, dtype: torch.dtype, mode: str = "fwd") -> int:
    """Bytes of the (B, H, N, d) tensors a mode must hold: q, k, v, o (+ dO, dq, dk, dv for a backward)."""
    return MODE_IO_TENSORS[mode] * B * H * N * d * torch.empty((), dtype=dtype).element_size()


def time_ms(step: Callable, device=None, warmup_ms: float = 25, rep_ms: float = 100, *,
            min_runs: int = CPU_MIN_RUNS) -> float:
    """Median milliseconds of ``step()`` on ``device`` (default: the GPU if there is one, else the CPU).

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls). CPU: ``step`` runs for
    ``warmup_ms`` (at least once), then at least ``min_runs`` times and for ``rep_ms``, with torch
    on ``CPU_THREADS`` threads; the median wall-clock time.
    """
    device = resolve_device(device)
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        _repeat(step, warmup_ms, runs=1)
        return statistics.median(_repeat(step, rep_ms, runs=min_runs))
    finally:
        torch.set_num_threads(threads)


def _repeat(step: Callable, ms: float, runs: int) -> list:
    """Wall-clock milliseconds of each call of ``step``: at least ``runs`` calls, and for ``ms`` at least."""
    times, end = [], time.perf_counter() + ms / 1e3
    while len(times) < runs or time.perf_counter() < end:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class _PeakTracker(TorchDispatchMode):
    """Counts the bytes of every tensor storage created by torch ops while active, and their peak.

    A storage stops counting when Python frees it, so ``peak`` is the most memory that the computation
    held at once — on any device, without an allocator API (the CPU has none).
    """

    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        # an output that shares a storage with an argument (a view, a slice, an in-place result) is no new memory
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() not in self.live and s.data_ptr() not in given and s.nbytes() > 0:
                    self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
                    self.current += s.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return (its result, the peak bytes it allocated beyond its inputs).

    When a tensor argument is on a GPU this is ``torch.cuda.max_memory_allocated`` above the memory
    in use before the call; otherwise every storage the call creates is counted while it is alive.
    """
    gpu = next((a.device for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and a.is_cuda), None)
    if gpu is None:
        with _PeakTracker() as tracker:
            out = fn(*args, **kwargs)
        return out, tracker.peak
    torch.cuda.synchronize(gpu)
    torch.cuda.reset_peak_memory_stats(gpu)
    before = torch.cuda.memory_allocated(gpu)
    out = fn(*args, **kwargs)
    torch.cuda.synchronize(gpu)
    return out, torch.cuda.max_memory_allocated(gpu) - before


def make_step(fn, q, k, v, causal: bool, mode: str, seed: int = 0) -> Callable:
    """The work one timed call does. ``bwd`` builds the forward graph once, here, and times the backward.

    The backward modes draw a random dO (B, H, N, d) here, so that ``fwd`` holds only q, k, v (and o).
    """
    if mode == "fwd":
        return lambda: _no_grad(fn, q, k, v, causal)
    g = torch.Generator(q.device).manual_seed(seed)
    dO = torch.randn(q.shape, generator=g, device=q.device, dtype=q.dtype)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    if mode == "bwd":
        o = fn(qg, kg, vg, causal)
        return lambda: torch.autograd.grad(o, (qg, kg, vg), dO, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(qg, kg, vg, causal), (qg, kg, vg), dO)
    raise ValueError(f"mode must be one of {tuple(MODE_FLOP_FACTOR)}, got {mode!r}")


def _no_grad(fn, q, k, v, causal: bool) -> torch.Tensor:
    with torch.no_grad():
        return fn(q, k, v, causal)


def gpu_peak_bytes(step: Callable, q: torch.Tensor) -> Optional[int]:
    """Peak GPU memory during one ``step()``, counting what is already allocated; None on the CPU."""
    if not q.is_cuda:
        return None
    held = torch.cuda.memory_allocated(q.device)
    # q tells peak_memory which GPU to watch
    return held + peak_memory(lambda _: step(), q)[1]
