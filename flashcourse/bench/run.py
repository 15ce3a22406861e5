"""The engine: ``benchmark`` runs every provider × mode of a plan on every shape of its grid.

For each shape: one set of random normal inputs (never zeros), shared by all providers, and one
float64 reference (check.py). For each provider and mode: check, then time and measure memory
(measure.py); every exception becomes a status with a note, and the run goes on. With
``per_config``, flashcourse is timed again with each launch config its autotuner tries (tuning.py).
With ``precompile_processes``, the Triton kernels are compiled first in parallel processes.
"""

import gc
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Callable, List, NamedTuple, Optional

import torch

from . import tuning
from .check import TOLERANCE, Reference, errors, verdict
from .measure import attention_flops, gpu_peak_bytes, io_bytes, make_step, time_ms
from .plan import DTYPES, Measurement, Plan, Shape, make_plan
from .providers import PROVIDERS, SLOW, Unavailable


class Inputs(NamedTuple):
    """One shape's random q, k, v (B, H, N, d), shared by every provider, and their reference."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ref: Reference


def benchmark(plan: Optional[Plan] = None, *, progress: bool = True, **options) -> List[Measurement]:
    """One ``Measurement`` per provider × mode × shape of ``plan`` (or of ``make_plan(**options)``).

    After ``plan.time_budget_s`` seconds, compiling included, the shapes not started are skipped.
    """
    plan = make_plan(**options) if plan is None else plan
    started = time.perf_counter()
    if plan.precompile_processes > 0 and "flashcourse" in plan.providers:
        precompile(plan)
    shapes, results = plan.shapes(), []
    with _progress_bar(len(shapes) * len(plan.providers) * len(plan.modes), progress) as bar:
        for shape in shapes:
            late = plan.time_budget_s is not None and time.perf_counter() - started > plan.time_budget_s
            results += _run_shape(plan, shape, bar, skip="time budget of the run used up" if late else "")
    return results


def _run_shape(plan: Plan, shape: Shape, bar, skip: str) -> List[Measurement]:
    """All providers and modes on one shape; ``skip`` (a reason) marks them all skipped instead."""
    device = torch.device(plan.device)
    inputs, blocked = None, ("skipped", skip) if skip else None
    if blocked is None:
        try:
            inputs = _random_inputs(shape, device, plan.seed)
        except Exception as exc:  # the inputs alone do not fit: every measurement of the shape says so
            status, note = classify(exc)
            blocked = (status, f"allocating the inputs: {note}")
    checks, results = {}, []  # checks: (provider, config, with_grad) -> (status, note, error), shared by modes
    for provider in plan.providers:
        for mode in plan.modes:
            bar.set_postfix_str(f"{provider} {mode} {shape.dtype} d={shape.d} N={shape.N}" + " causal" * shape.causal)
            results += _provider_mode(plan, Measurement.of(provider, mode, shape), inputs, blocked, checks)
            bar.update(1)
    inputs = None
    _free(device)
    return results


def _provider_mode(plan: Plan, m: Measurement, inputs: Inputs, blocked, checks: dict) -> List[Measurement]:
    """``m`` measured (or marked ``blocked`` = (status, note), or skipped when slow), then its per-config rows."""
    if blocked is not None:
        m.status, m.note = blocked
        return [m]
    if m.provider in SLOW and m.N > plan.slow_max_n:
        m.status, m.note = "skipped", f"{m.provider} is slow: skipped above N={plan.slow_max_n} (raise slow_max_n)"
        return [m]
    fn = {**PROVIDERS, **plan.extra_providers}[m.provider]
    _measure(plan, m, fn, inputs, checks)
    if plan.per_config and m.provider == "flashcourse" and m.status == "ok":
        return [m] + _per_config(plan, m, fn, inputs, checks)
    return [m]


def _random_inputs(shape: Shape, device: torch.device, seed: int) -> Inputs:
    g = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(shape.B, shape.H, shape.N, shape.d, generator=g, device=device, dtype=DTYPES[shape.dtype])
               for _ in range(3))
    return Inputs(q, k, v, Reference(q, k, v, shape.causal, seed))


def _measure(plan: Plan, m: Measurement, fn: Callable, inputs: Inputs, checks: dict, pin=nullcontext) -> None:
    """Check, then time one provider in one mode (within ``pin()``), filling ``m``; never raises."""
    with warnings.catch_warnings(record=True) as caught, pin():
        warnings.simplefilter("always")
        try:
            if plan.check:
                m.status, m.note, m.max_rel_err = _check(plan, m, fn, inputs, checks)
                if m.status != "ok":
                    return
            step = make_step(fn, inputs.q, inputs.k, inputs.v, m.causal, m.mode, plan.seed)
            step()  # compiling and autotuning, outside the measurement
            if m.provider == "flashcourse" and not m.pinned:
                m.config = tuning.chosen(m.mode)
            peak = gpu_peak_bytes(step, inputs.q)
            if peak is not None:
                m.peak_mib = peak / 2**20
                m.peak_over_io = peak / io_bytes(m.B, m.H, m.N, m.d, DTYPES[m.dtype], m.mode)
            m.ms = time_ms(step, plan.device, plan.warmup_ms, plan.rep_ms, min_runs=plan.min_runs)
            m.tflops = attention_flops(m.B, m.H, m.N, m.d, m.causal, m.mode) / (m.ms * 1e-3) / 1e12
        except Exception as exc:  # every failure of one provider is recorded and the run goes on
            m.status, m.note = classify(exc, caught)
        finally:
            step = None  # its tensors go before the cache is emptied
            _free(torch.device(plan.device))


def _check(plan: Plan, m: Measurement, fn: Callable, inputs: Inputs, checks: dict) -> tuple:
    """(status, note, error) of the check of ``m``'s provider (and config): its output, then for a
    backward mode its gradients. Each is computed once per shape and shared by the modes that need it."""
    tol = TOLERANCE[DTYPES[m.dtype]] if plan.tol is None else plan.tol
    for with_grad in (False, True) if m.mode != "fwd" else (False,):
        key = (m.provider, m.config, with_grad)
        if key not in checks:
            checks[key] = verdict(errors(fn, inputs.q, inputs.k, inputs.v, inputs.ref, with_grad), tol)
        if checks[key][0] != "ok":
            break
    return checks[key]


def _per_config(plan: Plan, m: Measurement, fn: Callable, inputs: Inputs, checks: dict) -> List[Measurement]:
    """flashcourse in ``m``'s mode and shape again, with each candidate config of each kernel pinned."""
    try:
        found = tuning.candidates(make_step(fn, inputs.q, inputs.k, inputs.v, m.causal, m.mode, plan.seed))
    except Exception as exc:  # e.g. the kernels changed under tuning.autotuners: say so, go on
        status, note = classify(exc)
        return [Measurement.of(m.provider, m.mode, m.shape, status=status, pinned=True,
                               note=f"listing the launch configs: {note}")]
    rows = []
    for kernel, configs in found.items():
        for config in configs:
            row = Measurement.of(m.provider, m.mode, m.shape, config=tuning.label(kernel, config), pinned=True)
            _measure(plan, row, fn, inputs, checks, pin=partial(tuning.pinned, kernel, config))
            rows.append(row)
    return rows


def classify(exc: BaseException, caught_warnings=()) -> tuple:
    """(status, note) for an exception raised while checking or timing a provider."""
    if isinstance(exc, Unavailable):
        return "skipped", _one_line(exc)
    if _is_oom(exc):
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return "oom", _one_line(f"{type(exc).__name__}: {first_line}")
    if isinstance(exc, RuntimeError) and ("No available kernel" in str(exc) or "No viable backend" in str(exc)):
        # PyTorch says why each backend declined in warnings: keep the specific ones
        reasons = [str(w.message) for w in caught_warnings if "not used because" not in str(w.message)]
        return "skipped", _one_line("backend unavailable here: " + ("; ".join(reasons) or str(exc)))
    return "error", _one_line(f"{type(exc).__name__}: {exc}")


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)
    )


def _one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _free(device: torch.device) -> None:
    """Drop what earlier measurements left on the GPU (tracebacks can hold tensors), so it cannot OOM later ones."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="run", disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# compiling ahead, in parallel
# --------------------------------------------------------------------------------------------------


def precompile(plan: Plan) -> None:
    """Compile the Triton kernels of the plan's shapes in ``plan.precompile_processes`` processes.

    Triton compiles each autotuning candidate on first use, one after another: dozens of kernels for a
    grid of dtypes, head dims and causal flags. One (dtype, d, causal) group per process fills Triton's
    disk cache in parallel; the timing process then loads the kernels instead of compiling them.
    Triton specialises a kernel on its integer arguments being 1 or multiples of 16, so each group runs
    the smallest sizes with the specialisations of its shapes. A failure is a warning: the timed run
    compiles what is missing and records the same error per shape.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    backward = any(mode != "fwd" for mode in plan.modes)
    groups = {}
    for s in plan.shapes():
        small_n = min(n for n in plan.seqlens if (n % 16 == 0) == (s.N % 16 == 0))
        groups.setdefault((s.dtype, s.d, s.causal), set()).add((min(s.B, 2), s.H, small_n))
    jobs = [(*key, sorted(sizes), backward, plan.device) for key, sizes in groups.items()]
    context = multiprocessing.get_context("spawn")  # a fresh CUDA context per process
    try:
        with ProcessPoolExecutor(min(plan.precompile_processes, len(jobs)), mp_context=context) as pool:
            problems = [p for p in pool.map(_compile_group, jobs) if p]
    except Exception as exc:  # e.g. a worker that died
        problems = [f"all shapes ({type(exc).__name__}: {exc})"]
    for problem in problems:
        warnings.warn(f"flashcourse bench: precompiling failed for {problem} (the run will say why)")


def _compile_group(job) -> str:
    """Run the kernels once on each size of one (dtype, d, causal) group; '' or what went wrong."""
    dtype, d, causal, sizes, backward, device = job
    try:
        for B, H, N in sizes:
            q, k, v = (torch.randn(B, H, N, d, device=device, dtype=DTYPES[dtype], requires_grad=backward)
                       for _ in range(3))
            o = PROVIDERS["flashcourse"](q, k, v, causal)
            if backward:
                o.backward(torch.randn_like(o))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # reported by the caller; the timed run records the same failure per shape
        return f"{dtype} d={d} causal={causal}: {_one_line(f'{type(exc).__name__}: {exc}')}"
    return ""
