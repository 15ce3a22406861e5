"""``flashcourse bench``: time attention implementations side by side, in one process.

Providers (``PROVIDERS``): ``flashcourse`` (the Triton kernels), ``tiled`` (FlashAttention-2 loops in
PyTorch), ``naive`` (S and P materialised), and PyTorch's ``scaled_dot_product_attention`` pinned to one
backend each: ``sdpa-flash`` (FlashAttention-2), ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``.
Modes: ``fwd``, ``bwd`` (the backward pass alone, the forward graph built once), ``fwd+bwd``.

Every provider is first checked against float64 naive attention on a slice of the same inputs (the
first batch entry, up to two heads, the last ``CHECK_ROWS`` query rows: with bottom-right causal
alignment those rows see exactly the keys they see in the full problem); a wrong provider is marked
``failed`` and not timed. A backend that cannot run on this device and dtype is ``skipped`` with
PyTorch's reason, an out-of-memory is ``oom``, any other exception ``error``; the run goes on.

Sizes follow the FlashAttention papers: B·N = 16k tokens and H·d = 2048 unless given. Times are the
median of ``triton.testing.do_bench`` on a GPU, of a wall-clock loop on the CPU (where the Triton
kernels run in the interpreter: use tiny sizes). FLOPs count the two matrix products of the forward
pass, 4·B·H·N²·d, halved when causal; the backward pass does 2.5 times that (five products, not two).

    results = benchmark(providers=["flashcourse", "sdpa-flash"], seqlens=[1024, 4096])
    print(format_results(results)); print(format_ratios(ratio_table(results)))
    save(results, "bench-results")          # bench.json, bench.csv, bench.png
"""

import argparse
import csv
import datetime
import gc
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ._env import HAS_CUDA
from .reference import naive_attention, naive_attention_backward
from .tiled import tiled_attention

MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of a mode in units of the forward pass: the backward pass runs five N×N×d products to the
# forward's two, so 2.5 forwards; forward + backward is 3.5.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# tensors of (B, H, N, d) a mode must hold at least: q, k, v, o, and for a backward dO, dq, dk, dv
MODE_IO_TENSORS = {"fwd": 4, "bwd": 8, "fwd+bwd": 8}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# largest ‖out − ref‖ / ‖ref‖ (outputs and each gradient) a provider may show against float64
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 5e-3, torch.float64: 1e-6}
CHECK_ROWS = 512  # query rows of the correctness check (the last ones of the sequence)
CHECK_HEADS = 2
SLOW_PROVIDERS = ("tiled",)  # a Python loop over tiles: skipped above ``slow_max_n``

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


class Unavailable(Exception):
    """A provider that cannot run here (no such backend on this device or dtype, not built yet)."""


# --------------------------------------------------------------------------------------------------
# providers: f(q, k, v, causal) -> o, q (B, H, N, d)
# --------------------------------------------------------------------------------------------------


def _flashcourse(q, k, v, causal):
    try:
        from .ops import KERNEL_DTYPES, flash_attention
    except ImportError as exc:
        raise Unavailable(f"flashcourse.flash_attention is not importable ({exc})") from None
    if q.dtype not in KERNEL_DTYPES:
        raise Unavailable(f"the Triton kernels take {', '.join(map(_dtype_name, KERNEL_DTYPES))}, not {_dtype_name(q.dtype)}")
    return flash_attention(q, k, v, causal=causal)


def _tiled(q, k, v, causal):
    return tiled_attention(q, k, v, causal=causal)


def _naive(q, k, v, causal):
    return naive_attention(q, k, v, causal=causal)


def _sdpa(backend_name: str) -> Provider:
    def run(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # is_causal is top-left aligned; the benchmark has Nq == Nk, where that is bottom-right too
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    run.__name__ = f"sdpa_{backend_name.lower()}"
    return run


PROVIDERS: Dict[str, Provider] = {
    "flashcourse": _flashcourse,
    "tiled": _tiled,
    "naive": _naive,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
}


# --------------------------------------------------------------------------------------------------
# sizes and counts
# --------------------------------------------------------------------------------------------------


def default_batch_heads(N: int, d: int, tokens: int = 16384, hidden: int = 2048):
    """(B, H) with B·N = ``tokens`` and H·d = ``hidden``, as in the FlashAttention papers (each >= 1)."""
    return max(1, tokens // N), max(1, hidden // d)


def attention_flops(B: int, H: int, N: int, d: int, causal: bool, mode: str = "fwd") -> float:
    """FLOPs of one call: 4·B·H·N²·d for the forward (QKᵀ and PV), halved when causal, ×2.5 for bwd."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # 2 products × 2 FLOPs per multiply-add × B·H·N·N·d
    flops = 4.0 * B * H * N * N * d
    return flops * (0.5 if causal else 1.0) * MODE_FLOP_FACTOR[mode]


def io_bytes(B: int, H: int, N: int, d: int, dtype: torch.dtype, mode: str = "fwd") -> int:
    """Bytes of the (B, H, N, d) tensors a mode must hold: q, k, v, o (+ dO, dq, dk, dv for a backward)."""
    return MODE_IO_TENSORS[mode] * B * H * N * d * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One (provider, mode, shape) of a run. ``ms``, ``tflops`` and the memory fields are None unless timed.

    ``status`` is ok, failed (wrong output or gradients), oom, skipped (cannot run here, or no time
    left) or error (any other exception); ``note`` says why.
    """

    provider: str
    mode: str
    dtype: str
    B: int
    H: int
    N: int
    d: int
    causal: bool
    status: str = "ok"
    ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None  # torch.cuda.max_memory_allocated during one call; None on the CPU
    peak_over_io: Optional[float] = None  # peak memory / io_bytes(...) of the mode
    max_rel_err: Optional[float] = None  # worst ‖out − ref‖ / ‖ref‖ of the check
    note: str = ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


def _no_backend(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("No available kernel" in text or "No viable backend" in text)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classify(exc: BaseException, caught_warnings=()) -> tuple:
    """(status, note) for an exception raised while checking or timing a provider."""
    if isinstance(exc, Unavailable):
        return "skipped", _one_line(exc)
    if _is_oom(exc):
        return "oom", _one_line(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if _no_backend(exc):
        # PyTorch says why each backend declined in warnings: keep the specific ones
        reasons = [str(w.message) for w in caught_warnings if "not used because" not in str(w.message)]
        return "skipped", _one_line("backend unavailable here: " + ("; ".join(reasons) or str(exc)))
    return "error", _one_line(f"{type(exc).__name__}: {exc}")


def _free(device: torch.device) -> None:
    """Drop what earlier measurements left on the GPU (tracebacks can hold tensors), so it cannot OOM later ones."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# correctness check
# --------------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (inf when a has a NaN or inf)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class _Reference:
    """Float64 naive attention on the check slice of one shape's inputs, kept on the CPU.

    The slice is batch 0, heads [0, CHECK_HEADS), query rows [N − r, N): with bottom-right causal
    alignment, query row i of the slice sees keys j <= i + N − r, exactly those of the full problem.
    """

    def __init__(self, q, k, v, causal: bool, seed: int = 0):
        B, H, N, d = q.shape
        r, h = min(N, CHECK_ROWS), min(H, CHECK_HEADS)
        self.index = (slice(0, 1), slice(0, h), slice(N - r, N))
        self.kv_index = (slice(0, 1), slice(0, h))
        self.causal = causal
        # dO of the check, in q's dtype so that the provider sees exactly these values
        self.dO_slice = torch.randn(1, h, r, d, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
        self.q = q[self.index].to("cpu", torch.float64)
        self.k, self.v = (t[self.kv_index].to("cpu", torch.float64) for t in (k, v))
        self._o = self._grads = None

    @property
    def o(self) -> torch.Tensor:
        if self._o is None:
            self._o = naive_attention(self.q, self.k, self.v, causal=self.causal)
        return self._o

    @property
    def grads(self) -> tuple:
        """(dq of the slice rows, dk, dv of the slice heads) for dO = ``dO_slice`` on the slice, 0 elsewhere."""
        if self._grads is None:
            dO = self.dO_slice.to(torch.float64)
            self._grads = naive_attention_backward(self.q, self.k, self.v, self.o, dO, causal=self.causal)
        return self._grads


def check_provider(fn: Provider, q, k, v, causal: bool, ref: _Reference, with_grad: bool) -> float:
    """Run ``fn`` on the full inputs and return the worst relative error on the check slice.

    With ``with_grad`` the backward pass runs too, with dO random on the slice rows and zero elsewhere,
    so that dq (slice rows), dk and dv (slice heads) are compared as well.
    """
    if not with_grad:
        with torch.no_grad():
            o = fn(q, k, v, causal)
        return rel_err(o[ref.index].cpu(), ref.o)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(qg, kg, vg, causal)
    err_o = rel_err(o[ref.index].detach().cpu(), ref.o)
    dO = torch.zeros_like(o)
    dO[ref.index] = ref.dO_slice.to(dO.device, dO.dtype)
    dq, dk, dv = torch.autograd.grad(o, (qg, kg, vg), dO)
    del o, dO
    got = (dq[ref.index], dk[ref.kv_index], dv[ref.kv_index])
    return max([err_o] + [rel_err(g.cpu(), w) for g, w in zip(got, ref.grads)])


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def _cpu_median_ms(step: Callable, warmup_ms: float, rep_ms: float) -> float:
    """Median wall-clock time of ``step`` on the CPU: warm up for ``warmup_ms``, then repeat for ``rep_ms``."""
    t_end = time.perf_counter() + warmup_ms / 1e3
    step()
    while time.perf_counter() < t_end:
        step()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while not times or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(step: Callable, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``step()``: ``triton.testing.do_bench`` on a GPU, a wall-clock loop on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _cpu_median_ms(step, warmup_ms, rep_ms)


def make_step(fn: Provider, q, k, v, causal: bool, mode: str, seed: int = 0) -> Callable:
    """The work one timed call does. ``bwd`` builds the forward graph once, here, and times the backward.

    The backward modes draw a random dO (B, H, N, d) here, so that ``fwd`` holds only q, k, v (and o).
    """
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(q, k, v, causal)

        return step
    g = torch.Generator(q.device).manual_seed(seed)
    dO = torch.randn(q.shape, generator=g, device=q.device, dtype=q.dtype)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    if mode == "bwd":
        o = fn(qg, kg, vg, causal)
        return lambda: torch.autograd.grad(o, (qg, kg, vg), dO, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(qg, kg, vg, causal), (qg, kg, vg), dO)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def peak_memory_bytes(step: Callable, device: torch.device) -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` over one call of ``step`` (counting what is already allocated)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _resolve_dtype(dt) -> torch.dtype:
    if isinstance(dt, torch.dtype):
        return dt
    if dt not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or a torch.dtype), got {dt!r}")
    return DTYPES[dt]


# What an argument left out (None) means, on a GPU and on the CPU (interpreted kernels: toy sizes).
DEFAULTS = {
    "cuda": dict(providers=["flashcourse", "naive", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"],
                 modes=["fwd", "bwd"], dtypes=["float16"], head_dims=[64, 128], causal=[False, True],
                 seqlens=[512, 1024, 2048, 4096, 8192, 16384], tokens=16384, hidden=2048, warmup_ms=25, rep_ms=100),
    "cpu": dict(providers=["flashcourse", "tiled", "naive", "sdpa-flash", "sdpa-math"],
                modes=["fwd", "bwd"], dtypes=["float32"], head_dims=[32], causal=[False, True],
                seqlens=[64, 128], tokens=128, hidden=64, warmup_ms=1, rep_ms=20),
}


def benchmark(
    providers: Optional[Sequence[str]] = None,
    modes: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence] = None,
    head_dims: Optional[Sequence[int]] = None,
    causal: Optional[Sequence[bool]] = None,
    seqlens: Optional[Sequence[int]] = None,
    batch: Optional[int] = None,
    heads: Optional[int] = None,
    tokens: Optional[int] = None,
    hidden: Optional[int] = None,
    device=None,
    warmup_ms: Optional[float] = None,
    rep_ms: Optional[float] = None,
    check: bool = True,
    tol: Optional[float] = None,
    slow_max_n: int = 4096,
    extra_providers: Optional[Mapping[str, Provider]] = None,
    time_budget_s: Optional[float] = None,
    precompile_processes: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> List[Measurement]:
    """Time every provider × mode × dtype × head dim × causal × N; return one ``Measurement`` each.

    Arguments left out take ``DEFAULTS[device type]``; ``batch`` and ``heads`` default to
    B = tokens // N and H = hidden // d (16k tokens and 2048 on a GPU, as in the FlashAttention papers).
    ``extra_providers`` adds providers ``f(q, k, v, causal) -> o`` by name (name them in ``providers``
    too). ``tol`` overrides the check's limit (``TOLERANCE`` by dtype). After ``time_budget_s`` seconds,
    precompiling included, the shapes not started are marked skipped. ``precompile_processes`` > 0
    first compiles the Triton kernels in that many processes (see ``precompile``). Inputs are random
    normal (never zeros), one set per shape, shared by all providers.
    """
    device = torch.device(device if device is not None else ("cuda" if HAS_CUDA else "cpu"))
    default = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    pick = lambda value, key: default[key] if value is None else value  # noqa: E731
    providers, modes = _as_list(pick(providers, "providers")), _as_list(pick(modes, "modes"))
    table = {**PROVIDERS, **(extra_providers or {})}
    unknown = [p for p in providers if p not in table]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(table)}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"unknown mode(s) {bad_modes}; choose from {list(MODES)}")
    shapes = []  # (dtype, d, causal, N, B, H)
    for dtype in _as_list(pick(dtypes, "dtypes")):
        for d in _as_list(pick(head_dims, "head_dims")):
            for c in _as_list(pick(causal, "causal")):
                for N in _as_list(pick(seqlens, "seqlens")):
                    B, H = default_batch_heads(N, d, pick(tokens, "tokens"), pick(hidden, "hidden"))
                    B, H = B if batch is None else batch, H if heads is None else heads
                    shapes.append((_resolve_dtype(dtype), d, bool(c), N, B, H))
    warmup_ms, rep_ms = pick(warmup_ms, "warmup_ms"), pick(rep_ms, "rep_ms")

    t_start = time.perf_counter()
    if precompile_processes > 0 and "flashcourse" in providers:
        try:
            problems = precompile(shapes, with_backward=any(m != "fwd" for m in modes),
                                  processes=precompile_processes, device=device)
        except Exception as exc:  # e.g. a worker that died: the timed run compiles what is missing itself
            problems = [f"all shapes ({type(exc).__name__}: {exc})"]
        for problem in problems:
            warnings.warn(f"flashcourse bench: precompiling failed for {problem} (the run will say why)")
    bar = _progress_bar(len(shapes) * len(providers) * len(modes), progress)
    results = []
    for dtype, d, is_causal, N, B, H in shapes:
        out_of_time = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
        results += _bench_shape(
            table, providers, modes, dtype, B, H, N, d, is_causal, device, warmup_ms, rep_ms,
            check, tol, slow_max_n, seed, bar, out_of_time,
        )
    bar.close()
    return results


def precompile(shapes, with_backward: bool, processes: int, device) -> List[str]:
    """Compile the Triton kernels for ``shapes`` [(dtype, d, causal, N, B, H)] in parallel processes.

    Triton compiles each autotuning candidate on first use, one after another: dozens of kernels for a
    grid of dtypes, head dims and causal flags. Running one (dtype, d, causal) group per process fills
    Triton's on-disk cache in parallel; the timing process then loads the compiled kernels (and
    autotunes, which is quick) instead of compiling them. Triton specialises a kernel on its integer
    arguments being 1 or multiples of 16, so each group runs the smallest sizes with the same
    specialisations as its shapes. Returns the groups that raised.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    groups: Dict[tuple, list] = {}
    for dtype, d, causal, N, B, H in shapes:
        groups.setdefault((_dtype_name(dtype), d, causal), []).append((B, H, N))
    jobs = []
    for key, sizes in groups.items():
        # the same specialisation as (B, H, N): B = 1 or 2, the smallest N with the same N % 16 == 0
        small = {(min(B, 2), H, min(n for _, _, n in sizes if (n % 16 == 0) == (N % 16 == 0))) for B, H, N in sizes}
        jobs.append((*key, sorted(small), with_backward, str(device)))
    context = multiprocessing.get_context("spawn")  # a fresh CUDA context per process
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context) as pool:
        return [problem for problem in pool.map(_compile_group, jobs) if problem]


def _compile_group(job) -> str:
    """Run the Triton kernels once on each size of one (dtype, d, causal) group; '' or what went wrong."""
    dtype_name, d, causal, sizes, with_backward, device = job
    try:
        for B, H, N in sizes:
            q, k, v = (torch.randn(B, H, N, d, device=device, dtype=DTYPES[dtype_name], requires_grad=with_backward)
                       for _ in range(3))
            o = _flashcourse(q, k, v, causal)
            if with_backward:
                o.backward(torch.randn_like(o))
        _sync(torch.device(device))
    except Exception as exc:  # reported by the caller; the timed run records the same failure per shape
        return f"{dtype_name} d={d} causal={causal}: {_one_line(f'{type(exc).__name__}: {exc}')}"
    return ""


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="run", disable=not enabled, file=sys.stderr)


def _bench_shape(table, providers, modes, dtype, B, H, N, d, causal, device, warmup_ms, rep_ms, check, tol,
                 slow_max_n, seed, bar, out_of_time) -> List[Measurement]:
    """All providers and modes on one shape: one set of random inputs and one reference."""
    tol = TOLERANCE[dtype] if tol is None else tol
    results, q, k, v, ref = [], None, None, None, None
    skip = ("skipped", "time budget of the run used up") if out_of_time else None  # (status, note) of all
    if skip is None:
        try:
            g = torch.Generator(device).manual_seed(seed)
            q, k, v = (torch.randn(B, H, N, d, generator=g, device=device, dtype=dtype) for _ in range(3))
            ref = _Reference(q, k, v, causal, seed)
        except Exception as exc:  # the inputs alone do not fit: every measurement of the shape says so
            status, note = _classify(exc)
            skip = (status, f"allocating the inputs: {note}")
    for name in providers:
        checked: Dict[bool, tuple] = {}  # with_grad -> (status, note, err) of this provider's check
        for mode in modes:
            m = Measurement(name, mode, _dtype_name(dtype), B, H, N, d, causal)
            bar.set_postfix_str(f"{name} {mode} {m.dtype} d={d} N={N}{' causal' if causal else ''}")
            if skip is not None:
                m.status, m.note = skip
            elif name in SLOW_PROVIDERS and N > slow_max_n:
                m.status, m.note = "skipped", f"{name} is slow: skipped above N={slow_max_n} (raise slow_max_n)"
            else:
                _measure(m, table[name], q, k, v, ref, device, warmup_ms, rep_ms, check, tol, checked, seed)
            results.append(m)
            bar.update(1)
    q = k = v = ref = None
    _free(device)
    return results


def _measure(m: Measurement, fn, q, k, v, ref, device, warmup_ms, rep_ms, check, tol, checked, seed) -> None:
    """Check then time one provider in one mode, filling ``m``; exceptions become a status and a note."""
    with_grad = m.mode != "fwd"
    needed = [False, True] if with_grad else [False]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if check:
                for wg in needed:
                    if wg not in checked:
                        checked[wg] = _checked(fn, q, k, v, causal=m.causal, ref=ref, with_grad=wg, tol=tol)
                    m.status, m.note, err = checked[wg]
                    if err is not None:
                        m.max_rel_err = err if m.max_rel_err is None else max(m.max_rel_err, err)
                    if m.status != "ok":
                        return
            _free(device)
            step = make_step(fn, q, k, v, m.causal, m.mode, seed)
            step()  # warm-up and autotuning, outside the peak memory and the timing
            peak = peak_memory_bytes(step, device)
            if peak is not None:
                m.peak_mib = peak / 2**20
                m.peak_over_io = peak / io_bytes(m.B, m.H, m.N, m.d, q.dtype, m.mode)
            m.ms = time_ms(step, device, warmup_ms, rep_ms)
            m.tflops = attention_flops(m.B, m.H, m.N, m.d, m.causal, m.mode) / (m.ms * 1e-3) / 1e12
        except Exception as exc:  # every failure of one provider is recorded and the run goes on
            m.status, m.note = _classify(exc, caught)
        finally:
            step = None
            _free(device)


def _checked(fn, q, k, v, *, causal, ref, with_grad, tol) -> tuple:
    """(status, note, error) of the correctness check of one provider."""
    what = "output and gradients" if with_grad else "output"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            err = check_provider(fn, q, k, v, causal, ref, with_grad)
        except Exception as exc:  # classified: unavailable backend, out of memory, or a real error
            status, note = _classify(exc, caught)
            return status, f"check of the {what}: {note}", None
    if not err <= tol:  # also catches NaN
        return "failed", f"wrong {what}: relative error {err:.2e} > {tol:.0e} against float64 naive attention", err
    return "ok", "", err


# --------------------------------------------------------------------------------------------------
# provenance, files, tables, plot
# --------------------------------------------------------------------------------------------------


def _run_quiet(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def provenance(command: Optional[str] = None) -> dict:
    """Where and with what the numbers were taken: device, driver, CUDA, cuDNN, torch, triton, python, date.

    ``command`` is the command line to record (default: this process's ``sys.argv``).
    """
    import triton

    from ._env import INTERPRET

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreter": bool(INTERPRET),
        "numpy": _module_version("numpy"),
        "git_commit": _run_quiet(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]),
    }
    if HAS_CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            compute_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            sm_count=p.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()})", cuda=None, driver=None)
    return info


def _module_version(name: str) -> Optional[str]:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


CSV_PROVENANCE = ("device", "torch", "triton", "date")


def save(results: Sequence[Measurement], out_dir, name: str = "bench", command: Optional[str] = None,
         extra: Optional[dict] = None, plot_file: bool = True) -> dict:
    """Write ``name``.json (provenance + results + ratios), ``name``.csv and ``name``.png under ``out_dir``.

    ``command`` is recorded in the provenance (default ``sys.argv``); ``extra`` adds keys to the JSON.
    Returns the paths written, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(command)
    rows = [asdict(m) for m in results]
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv"}
    payload = {"provenance": prov, **(extra or {}), "results": rows, "ratios": ratio_table(results)}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Measurement)] + list(CSV_PROVENANCE))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{key: prov.get(key) for key in CSV_PROVENANCE}})
    if plot_file:
        fig = plot(results, title=f"{prov['device']} · torch {prov['torch']} · triton {prov['triton']}")
        paths["png"] = out / f"{name}.png"
        fig.savefig(paths["png"], dpi=110)
    return paths


def load(path) -> List[Measurement]:
    """The measurements of a JSON file written by ``save``."""
    return [Measurement(**row) for row in json.loads(Path(path).read_text())["results"]]


def plot(results: Sequence[Measurement], title: str = ""):
    """TFLOP/s against N, one line per provider, one panel per (mode, dtype, d, causal); returns the Figure."""
    from matplotlib.figure import Figure

    panels: Dict[tuple, List[Measurement]] = {}
    for m in results:
        panels.setdefault((m.mode, m.dtype, m.d, m.causal), []).append(m)
    n = max(1, len(panels))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(m.provider for m in results))}
    for ax, ((mode, dtype, d, causal), ms) in zip(axes, panels.items()):
        for provider, color in colors.items():
            pts = sorted((m.N, m.tflops) for m in ms if m.provider == provider and m.status == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} · {dtype} · d={d}{' · causal' if causal else ''}", fontsize=9)
        ax.set_xlabel("N (sequence length)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fmt_value(x, spec: str, width: int = 0) -> str:
    """``x`` formatted with ``spec``, or n/a, right-aligned in ``width`` characters."""
    return format("n/a" if x is None else format(x, spec), f">{width}")


def format_results(results: Sequence[Measurement]) -> str:
    """A plain-text table of the measurements (ms, TFLOP/s, peak memory, status)."""
    head = f"{'provider':<15}{'mode':<8}{'dtype':<9}{'B':>4}{'H':>4}{'N':>7}{'d':>5} {'causal':<7}" \
           f"{'ms':>10} {'TFLOP/s':>9}{'peak MiB':>10}  status"
    lines = [head, "-" * len(head)]
    for m in results:
        status = m.status if not m.note else _one_line(f"{m.status}: {m.note}", 120)
        lines.append(
            f"{m.provider:<15}{m.mode:<8}{m.dtype:<9}{m.B:>4}{m.H:>4}{m.N:>7}{m.d:>5} {str(m.causal):<7}"
            f"{fmt_value(m.ms, '.3f', 10)} {fmt_value(m.tflops, '.4g', 9)}{fmt_value(m.peak_mib, '.0f', 10)}  {status}"
        )
    return "\n".join(lines)


# the issue-7 targets: (mode, baseline) -> (minimum ratio, smallest N it applies to)
TARGETS = {
    ("fwd", "sdpa-flash"): (1.2, 0),
    ("fwd", "sdpa-cudnn"): (0.8, 4096),
    ("bwd", "sdpa-flash"): (1.0, 0),
    ("bwd", "sdpa-cudnn"): (0.6, 4096),
}


def ratio_table(results: Sequence[Measurement], provider: str = "flashcourse",
                baselines: Sequence[str] = ("sdpa-flash", "sdpa-cudnn")) -> List[dict]:
    """Per (mode, dtype, d, causal, N, B, H): ``provider``'s TFLOP/s over each baseline's (None if either is missing).

    ``meets`` says whether every ratio reaches its ``TARGETS`` entry (None where no target applies).
    """
    by_key = {(m.provider, m.mode, m.dtype, m.d, m.causal, m.N, m.B, m.H): m for m in results}
    rows = []
    for (p, *key), m in by_key.items():
        if p != provider:
            continue
        row = dict(zip(("mode", "dtype", "d", "causal", "N", "B", "H"), key), tflops=m.tflops)
        verdicts = []
        for base in baselines:
            b = by_key.get((base, *key))
            ok = m.status == "ok" and b is not None and b.status == "ok"
            ratio = m.tflops / b.tflops if ok else None
            row[base] = ratio
            target = TARGETS.get((row["mode"], base))
            if ratio is not None and target is not None and row["N"] >= target[1]:
                verdicts.append(ratio >= target[0])
        row["meets"] = all(verdicts) if verdicts else None
        rows.append(row)
    return rows


def format_ratios(rows: Sequence[dict], baselines: Sequence[str] = ("sdpa-flash", "sdpa-cudnn")) -> str:
    """The ratio table as Markdown."""
    cols = ["mode", "dtype", "d", "causal", "N", "TFLOP/s"] + [f"/ {b}" for b in baselines] + ["target met"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        meets = {True: "yes", False: "NO", None: "-"}[r["meets"]]
        cells = [r["mode"], r["dtype"], str(r["d"]), "yes" if r["causal"] else "no", str(r["N"]), fmt_value(r["tflops"], ".4g")]
        cells += [fmt_value(r.get(b), ".2f") for b in baselines] + [meets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> List[bool]:
    choices = {"no": [False], "yes": [True], "both": [False, True]}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"--causal takes no, yes or both, got {text!r}")
    return choices[text]


def _default_help(key: str) -> str:
    """'[GPU default / CPU default]' for the help text."""
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    return f"[{show(DEFAULTS['cuda'][key])} / {show(DEFAULTS['cpu'][key])}]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashcourse bench",
        description="Time attention implementations side by side: ms, TFLOP/s, peak memory; each checked "
        "against float64 naive attention first. Writes NAME.json, NAME.csv and NAME.png under --out.",
        epilog="Examples:\n"
        "  flashcourse bench --providers flashcourse sdpa-flash sdpa-cudnn --modes fwd bwd --d 64 128\n"
        "  flashcourse bench --n 64 128 --batch 1 --heads 2 --d 32      (CPU: tiny sizes, interpreted kernels)\n"
        "Defaults in brackets: [on a GPU / on a CPU-only machine].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="P",
                   help=f"any of {', '.join(PROVIDERS)} {_default_help('providers')}")
    p.add_argument("--modes", nargs="+", choices=MODES, help=_default_help("modes"))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help=_default_help("dtypes"))
    p.add_argument("--d", nargs="+", type=int, help="head dims " + _default_help("head_dims"))
    p.add_argument("--causal", type=_parse_bool, help="no, yes or both [both]")
    p.add_argument("--n", nargs="+", type=int, help="sequence lengths " + _default_help("seqlens"))
    p.add_argument("--batch", type=int, help="B [tokens // N]")
    p.add_argument("--heads", type=int, help="H [hidden // d]")
    p.add_argument("--tokens", type=int, help="B·N when --batch is not given " + _default_help("tokens"))
    p.add_argument("--hidden", type=int, help="H·d when --heads is not given " + _default_help("hidden"))
    p.add_argument("--warmup", type=float, help="warm-up per timing, ms " + _default_help("warmup_ms"))
    p.add_argument("--rep", type=float, help="timed repetitions per timing, ms " + _default_help("rep_ms"))
    p.add_argument("--no-check", action="store_true", help="time without checking against the reference")
    p.add_argument("--tol", type=float, default=None, help="relative-error limit of the check [by dtype]")
    p.add_argument("--slow-max-n", type=int, default=4096, help="largest N for the tiled provider [4096]")
    p.add_argument("--precompile", type=int, default=0, metavar="PROCS",
                   help="compile the Triton kernels of all shapes first, in PROCS parallel processes [0: off]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="directory for the files [bench-results]")
    p.add_argument("--name", default="bench", help="file stem: NAME.json, NAME.csv, NAME.png [bench]")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``flashcourse bench``; exit status 1 when a provider failed its check or raised an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    for flag, values in (("--n", a.n), ("--d", a.d), ("--batch", [a.batch]), ("--heads", [a.heads])):
        if any(x is not None and x < 1 for x in values or []):
            print(f"flashcourse bench: {flag} takes positive sizes, got {values}", file=sys.stderr)
            return 2
    results = benchmark(
        providers=a.providers, modes=a.modes, dtypes=a.dtype, head_dims=a.d, causal=a.causal, seqlens=a.n,
        batch=a.batch, heads=a.heads, tokens=a.tokens, hidden=a.hidden, warmup_ms=a.warmup, rep_ms=a.rep,
        check=not a.no_check, tol=a.tol, slow_max_n=a.slow_max_n, precompile_processes=a.precompile, seed=a.seed,
        progress=not a.quiet,
    )
    print(format_results(results))
    if any(m.provider == "flashcourse" for m in results):
        print()
        print(format_ratios(ratio_table(results)))
    paths = save(results, a.out, a.name, command=shlex.join(["flashcourse", "bench", *argv]), plot_file=not a.no_plot)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    bad = [m for m in results if m.status in ("failed", "error")]
    if bad:
        print(f"\n{len(bad)} measurement(s) failed or raised: see the status column", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
