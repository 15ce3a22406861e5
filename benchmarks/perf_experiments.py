"""Issue 18's experiments in one GPU run (about 8 minutes, compiling included): what each idea gains.

    PYTHONPATH=. python3 benchmarks/perf_experiments.py OUT              # the run (H100 / H200)
    PYTHONPATH=. python3 benchmarks/perf_experiments.py OUT --quick      # toy sizes, CPU or GPU, for the tests

Every measurement goes through ``flashcourse.bench``: random normal inputs, a check against float64
naive attention on a slice of them before timing (a variant that fails is not timed), then
``triton.testing.do_bench``'s median. Our variants are ``flash_attention`` calls with configurations
pinned (``FLASHCOURSE_CONFIG_*``, benchmarks/NOTES_forward.md and NOTES_backward.md say why each):

A. forward grid (fp16, bf16; d 64, 128; causal and not; N 1024, 4096, 16384; B·N = 16k, H·d = 2048):
   ``flashcourse`` (the default: autotuned) against pinned configurations, with and without Triton's
   warp specialization of the key loop (``,ws``), and ``sdpa-flash``, ``sdpa-cudnn``;
B. backward on the same grid: the deterministic two-kernel backward (``flashcourse``) against the
   one kernel that adds dQ with atomics (``flashcourse-atomic``: autotuned; ``@config``: pinned, per
   element atomics or, with ``,tma``, Hopper's tensor reductions) and the SDPA backends;
C. long context: B = 1, H = 16, d = 128, N = 131072, causal, fp16, fwd+bwd; peak memory over the
   bytes of q, k, v, o, dO, dq, dk, dv;
D. d = 96 and d = 256, bf16 (padded to 128 and 256 in the kernels), fwd and bwd, against every SDPA
   backend that runs them.

The kernels are compiled first, in parallel processes (``--precompile``); a variant that is new to
Triton (warp specialization, tensor reductions) is measured only if it compiled and ran there, in
time. Each part stops starting shapes when its share of ``--budget`` seconds is spent. Files under
OUT: perf-CARD.json (provenance, every measurement, the autotuner's per-config timings, the tables),
perf-CARD.csv, perf-CARD.png, perf-CARD.md (the tables, also printed last). Issue 18's targets for
the default kernels: ``python3 benchmarks/check_targets.py OUT/perf-CARD.json``.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a bare checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # record.py

import flashcourse  # noqa: E402  (before triton: on a CPU it switches the interpreter on)
from flashcourse import bench  # noqa: E402
from flashcourse.bench.report import card_name  # noqa: E402
from record import SIZES as RECORDED  # noqa: E402
from record import long_context_rows  # noqa: E402


class Variant(NamedTuple):
    """One way of running flashcourse: configurations pinned per kernel (none: autotuned) and the backward."""

    name: str
    pins: Dict[str, str]  # kernel -> "B_r,B_c,warps,stages[,tma][,ws]" (configs.parse_config)
    deterministic: bool = True
    new_to_triton: bool = False  # measured only where it compiled and ran while precompiling
    needs_gpu: bool = False  # Triton's interpreter cannot run it


def pinned(kernel: str, config: str) -> Variant:
    """flashcourse with ``kernel``'s configuration pinned; "dkdvdq" is the backward with atomics."""
    flags = set(config.split(",")[4:])
    tensor_reductions = kernel == "dkdvdq" and "tma" in flags
    return Variant(f"flashcourse{'-atomic' if kernel == 'dkdvdq' else ''}@{config}", {kernel: config},
                   deterministic=kernel != "dkdvdq", new_to_triton="ws" in flags or tensor_reductions,
                   needs_gpu=tensor_reductions)


DEFAULT = Variant("flashcourse", {})
ATOMIC = Variant("flashcourse-atomic", {}, deterministic=False)
# per head dim: the variants of the forward (A) and of the backward (B); the default, ATOMIC and the
# SDPA backends run everywhere. The pinned forward twins are the H100 winners (benchmarks/NOTES_forward.md)
FORWARD_VARIANTS = {
    64: [pinned("forward", "128,64,4,3,tma"), pinned("forward", "128,64,4,3,tma,ws")],
    128: [pinned("forward", "128,64,4,2,tma"), pinned("forward", "128,64,4,2,tma,ws"),
          pinned("forward", "128,128,8,2,tma"), pinned("forward", "128,128,8,2,tma,ws")],
}
BACKWARD_VARIANTS = {
    64: [pinned("dkdvdq", "32,128,4,4"), pinned("dkdvdq", "32,128,4,4,tma")],
    128: [pinned("dkdvdq", "64,128,8,3"), pinned("dkdvdq", "64,128,8,3,tma")],
}
SDPA = ["sdpa-flash", "sdpa-cudnn"]
ROW_SDPA = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]

SIZES = {
    # the recorded run's grid, long context and timing (benchmarks/record.py), and the other head dims
    "full": dict(
        **{part: RECORDED["full"][part] for part in ("grid", "long", "timing")},
        rows=dict(dtypes=["bfloat16"], head_dims=[96, 256], causal=[False, True], seqlens=[1024, 4096, 16384],
                  tokens=16384, hidden=2048),
        precompile_n=1024,
    ),
    # every part and kind of variant at toy sizes (the d = 64 variants stand for all): CPU or GPU
    "quick": dict(
        grid=dict(dtypes=["float16"], head_dims=[32], causal=[True], seqlens=[64], batch=1, heads=2),
        long=dict(dtypes=["float16"], head_dims=[32], causal=[True], seqlens=[80], batch=1, heads=1),
        rows=dict(dtypes=["bfloat16"], head_dims=[24], causal=[True], seqlens=[48], batch=1, heads=2),
        timing=dict(warmup_ms=0, rep_ms=1, min_runs=1),
        precompile_n=64,
    ),
}
# the share of --budget by which each part has ended (the precompiling) or starts no more shapes; with
# the default 480 s: compiling <= 144 s (about 80 on an H100), A and B until 298 s (about 190 s of
# work), C until 384 s, D until 456 s, then the files
PART_ENDS = {"precompile": 0.3, "grid": 0.62, "long": 0.8, "rows": 0.95}
LONG_SECONDS = 60  # part C needs about this long on an H100: it starts only if that much of its share is left

# (variant name, dtype, d, causal) -> why it is not measured there (filled by precompiling)
UNAVAILABLE: Dict[Tuple[str, str, int, bool], str] = {}


def variants_for(d: int, quick: bool) -> Tuple[list, list]:
    """(forward variants, backward variants) of head dim d, the default and ATOMIC first."""
    key = 64 if quick else d
    return [DEFAULT] + FORWARD_VARIANTS.get(key, []), [DEFAULT, ATOMIC] + BACKWARD_VARIANTS.get(key, [])


# ------------------------------------------------------------------------------------------------
# variants as providers of flashcourse.bench


def pin(pins: Dict[str, str]) -> None:
    """FLASHCOURSE_CONFIG_<KERNEL> = pins[kernel] for every kernel, the others unset (autotuned)."""
    from flashcourse.kernels.configs import KERNELS

    for kernel in KERNELS:
        name = f"FLASHCOURSE_CONFIG_{kernel.upper()}"
        if kernel in pins:
            os.environ[name] = pins[kernel]
        else:
            os.environ.pop(name, None)


def provider(variant: Variant):
    """``f(q, k, v, causal) -> o`` for flashcourse.bench. It pins the variant's configurations when it is
    called, and they stay pinned: the engine measures one provider at a time, so the backward of a
    ``bwd`` measurement (run after the call) uses them too; the next provider pins its own."""

    def run(q, k, v, causal):
        from flashcourse import INTERPRET, flash_attention

        why = UNAVAILABLE.get((variant.name, str(q.dtype).replace("torch.", ""), q.shape[-1], causal))
        if why:
            raise bench.Unavailable(why)
        if variant.needs_gpu and INTERPRET:
            raise bench.Unavailable("descriptor reductions need a GPU: Triton's interpreter has none")
        pin(variant.pins)
        return flash_attention(q, k, v, causal=causal, deterministic=variant.deterministic)

    run.__name__ = variant.name
    return run


# ------------------------------------------------------------------------------------------------
# compiling first, in parallel processes


class Job(NamedTuple):
    variant: Variant
    mode: str  # "fwd": the forward alone; "bwd": the backward alone (O and L from naive attention)
    dtype: str
    d: int
    causal: bool
    H: int
    N: int


# seconds after which a started job that has not ended is taken for dead (a compiler that crashed the
# process, or a kernel that hangs): the autotuned ones compile every candidate, a pinned one only itself
STALE_SECONDS = {True: 45, False: 150}
_started = None  # in a compiling process: the queue on which each job says when it starts


def _compiling_process(started) -> None:
    global _started
    _started = started


def compile_job(index: int, job: Job) -> str:
    """Run one variant once at a small size (compiling every kernel it launches); '' or what went wrong.

    Small sizes with the same integer specialisations as the timed ones (H as in the grid; N, strides
    multiples of 16), so that the timing process finds every kernel in Triton's disk cache.
    """
    if _started is not None:
        _started.put((index, time.perf_counter()))
    try:
        import torch

        from flashcourse import flash_attention, naive_attention
        from flashcourse.kernels.backward import attention_backward

        pin(job.variant.pins)
        dtype, device = bench.DTYPES[job.dtype], "cuda" if torch.cuda.is_available() else "cpu"
        q, k, v, do = (torch.randn(1, job.H, job.N, job.d, device=device, dtype=dtype) for _ in range(4))
        if job.mode == "fwd":
            with torch.no_grad():
                flash_attention(q, k, v, causal=job.causal, deterministic=job.variant.deterministic)
        else:
            o, lse = naive_attention(q, k, v, causal=job.causal, return_lse=True)
            attention_backward(q, k, v, o.to(dtype), lse.float(), do, causal=job.causal, scale=job.d**-0.5,
                               deterministic=job.variant.deterministic)
        if device == "cuda":
            torch.cuda.synchronize()
        return ""
    except BaseException as exc:  # noqa: BLE001  (reported, and the variant skipped where it matters)
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def compile_jobs(sizes: dict, quick: bool) -> list:
    """One job per (variant, mode, dtype, d, causal) of parts A, B and D (C's are among A's and B's)."""
    jobs = []
    for part in ("grid", "rows"):
        spec = sizes[part]
        for dtype in spec["dtypes"]:
            for d in spec["head_dims"]:
                H = spec.get("heads") or spec["hidden"] // d  # as in the part's grid (bench.default_batch_heads)
                forward, backward = variants_for(d, quick) if part == "grid" else ([DEFAULT], [DEFAULT, ATOMIC])
                for causal in spec["causal"]:
                    jobs += [Job(v, "fwd", dtype, d, causal, H, sizes["precompile_n"]) for v in forward]
                    jobs += [Job(v, "bwd", dtype, d, causal, H, sizes["precompile_n"]) for v in backward]
    # the autotuned kernels compile every candidate: start those first, so that they do not end last
    return sorted(jobs, key=lambda job: (bool(job.variant.pins), -job.d))


def precompile(jobs: list, processes: int, deadline: float) -> list:
    """Run ``compile_job`` over ``jobs`` in spawned processes until done or ``deadline``; mark the
    variants new to Triton whose job failed or did not end as unavailable. Returns [(job, problem)]."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started_queue = context.SimpleQueue()
    pool = context.Pool(processes, initializer=_compiling_process, initargs=(started_queue,))
    pending = [(job, pool.apply_async(compile_job, (i, job))) for i, job in enumerate(jobs)]
    started = {}  # job index -> when it started (time.perf_counter is system-wide on Linux)

    def dead(i: int) -> bool:
        return i in started and time.perf_counter() - started[i] > STALE_SECONDS[bool(jobs[i].variant.pins)]

    while time.perf_counter() < deadline:
        while not started_queue.empty():
            i, when = started_queue.get()
            started[i] = when
        if all(result.ready() or dead(i) for i, (_, result) in enumerate(pending)):
            break
        time.sleep(0.5)
    outcome = [(job, result.get() if result.ready() else "did not end (a crash, a hang, or no time left)")
               for job, result in pending]
    pool.terminate()
    for job, problem in outcome:
        if problem and job.variant.new_to_triton:
            UNAVAILABLE[(job.variant.name, job.dtype, job.d, job.causal)] = f"precompiling it failed: {problem}"
    return outcome


# ------------------------------------------------------------------------------------------------
# measuring, and the autotuner's own timings


class Run:
    """The measurements so far, the autotuner's per-config timings, and the clock of the run."""

    def __init__(self, budget: float, timing: dict, progress: bool):
        self.t0, self.budget, self.timing, self.progress = time.perf_counter(), budget, timing, progress
        self.results, self.tunings, self._seen = [], [], {}

    def until(self, part: str) -> float:
        return self.t0 + PART_ENDS[part] * self.budget

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def measure(self, variants: list, sdpa: list, mode: str, spec: dict) -> list:
        """flashcourse.bench on one shape (``spec``: one value per grid field) for these providers, in
        ``mode``; records the tunings it caused and the autotuner's choice for the atomic backward."""
        from flashcourse.kernels.configs import AUTOTUNERS

        providers = {v.name: provider(v) for v in variants}
        found = bench.benchmark(providers=list(providers) + sdpa, modes=[mode], extra_providers=providers,
                                progress=self.progress, **spec, **self.timing)
        pin({})
        self._harvest(found[0], mode)
        # flashcourse.bench names the autotuner's choice for ``flashcourse`` only: the same for ATOMIC
        atomic = getattr(AUTOTUNERS.get("dkdvdq"), "best_config", None)
        for m in found:
            if m.provider == ATOMIC.name and m.status == "ok" and atomic is not None:
                m.config = bench.tuning.label("dkdvdq", atomic)
        self.results += found
        return found

    def _harvest(self, m, mode: str) -> None:
        """The per-config timings of every autotuner that tuned during the last call (Triton keeps the
        last tuning's), under the shape ``m`` of that call."""
        from flashcourse.kernels.configs import AUTOTUNERS

        for kernel, tuner in AUTOTUNERS.items():
            timings = getattr(tuner, "configs_timings", None)
            if timings is None or self._seen.get(kernel) is timings:
                continue
            self._seen[kernel] = timings
            ms = {bench.tuning.label(kernel, c): (t[0] if isinstance(t, (list, tuple)) else t)
                  for c, t in timings.items()}
            self.tunings.append(dict(kernel=kernel, mode=mode, dtype=m.dtype, d=m.d, causal=m.causal, N=m.N,
                                     best=min(ms, key=ms.get), ms=ms))


def shape_spec(part_spec: dict, dtype: str, d: int, causal: bool, N: int) -> dict:
    """The grid fields of ``part_spec`` narrowed to one shape."""
    return {**part_spec, "dtypes": [dtype], "head_dims": [d], "causal": [causal], "seqlens": [N]}


def grid_shapes(spec: dict) -> list:
    """The shapes of a part, the most telling first: d = 128 (furthest from cuDNN), N >= 4096 (the targets)."""
    shapes = [(dtype, d, causal, N) for dtype in spec["dtypes"] for d in spec["head_dims"]
              for causal in spec["causal"] for N in spec["seqlens"]]
    return sorted(shapes, key=lambda s: (s[3] < 4096, -s[1], s[0] != "float16", s[2], s[3]))


# ------------------------------------------------------------------------------------------------
# tables: what each variant gained


def short(provider: str) -> str:
    """``flashcourse`` -> default, ``flashcourse@128,64,4,2,tma`` -> @128,64,4,2,tma,
    ``flashcourse-atomic@64,128,8,3`` -> atomic@64,128,8,3."""
    if provider == "flashcourse":
        return "default"
    return provider.replace("flashcourse-", "").replace("flashcourse", "")


def by_shape(results, mode: str) -> dict:
    """(dtype, d, causal, N) -> {provider: measurement} of one mode."""
    shapes = {}
    for m in results:
        if m.mode == mode and not m.pinned:
            shapes.setdefault((m.dtype, m.d, m.causal, m.N), {})[m.provider] = m
    return shapes


def ratio(row: dict, num: str, den: str) -> Optional[float]:
    a, b = row.get(num), row.get(den)
    ok = a is not None and b is not None and a.status == b.status == "ok"
    return a.tflops / b.tflops if ok else None


def best(row: dict, prefix: str) -> Optional[str]:
    """The fastest provider of ``row`` whose name starts with ``prefix`` (None if none ran)."""
    ran = [p for p, m in row.items() if p.startswith(prefix) and m.status == "ok"]
    return max(ran, key=lambda p: row[p].tflops) if ran else None


def table(results, mode: str, head_dims) -> str:
    """TFLOP/s of every provider per shape (ours also × the default), and ours ÷ SDPA: Markdown."""
    shapes = {key: row for key, row in by_shape(results, mode).items() if key[1] in head_dims}
    providers = list(dict.fromkeys(p for row in shapes.values() for p in row))
    ours = [p for p in providers if p.startswith("flashcourse")]
    cols = ["dtype", "d", "causal", "N"] + [short(p) for p in providers] + [
        "default ÷ cudnn", "default ÷ best SDPA", "best ours", "best ÷ cudnn", "best ÷ best SDPA"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (dtype, d, causal, N), row in sorted(shapes.items()):
        cells = [dtype, str(d), "yes" if causal else "no", str(N)]
        for p in providers:
            m = row.get(p)
            if m is None:
                cells.append("")
            elif m.status != "ok":
                cells.append(m.status)
            else:
                times = ratio(row, p, "flashcourse") if p in ours and p != "flashcourse" else None
                cells.append(f"{m.tflops:.3g}" + (f" ×{times:.2f}" if times else ""))
        top, sdpa = best(row, "flashcourse"), best(row, "sdpa")
        cells += [bench.fmt_value(ratio(row, "flashcourse", "sdpa-cudnn"), ".2f"),
                  bench.fmt_value(sdpa and ratio(row, "flashcourse", sdpa), ".2f") + (f" ({sdpa})" if sdpa else ""),
                  short(top) if top else "n/a", bench.fmt_value(top and ratio(row, top, "sdpa-cudnn"), ".2f"),
                  bench.fmt_value(top and sdpa and ratio(row, top, sdpa), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(values) -> str:
    """Geometric mean (min–max, count) of ratios."""
    if not values:
        return "n/a (no shape where both ran)"
    mean = math.exp(sum(math.log(v) for v in values) / len(values))
    return f"×{mean:.3f} (min {min(values):.2f}, max {max(values):.2f}, {len(values)} shapes)"


def decisions(results, grid_dims, row_dims, extra: dict) -> list:
    """One line per question the run answers (benchmarks/NOTES_*.md say what each decides)."""
    lines = []
    for mode in ("fwd", "bwd"):
        shapes = {k: row for k, row in by_shape(results, mode).items() if k[1] in grid_dims}
        providers = dict.fromkeys(p for row in shapes.values() for p in row if p.startswith("flashcourse@")
                                  or p.startswith("flashcourse-atomic"))
        for p in providers:
            lines.append(f"- {mode} {short(p)} ÷ default: "
                         f"{spread([r for row in shapes.values() if (r := ratio(row, p, 'flashcourse'))])}")
            for flag in (",ws", ",tma"):
                if p.endswith(flag) and p[: -len(flag)] in providers:
                    twin = p[: -len(flag)]
                    lines.append(f"- {mode} {short(p)} ÷ {short(twin)} (the flag alone): "
                                 f"{spread([r for row in shapes.values() if (r := ratio(row, p, twin))])}")
        for p in ["flashcourse", *providers]:
            at_scale = [r for (_, _, _, N), row in shapes.items() if N >= 4096 and (r := ratio(row, p, "sdpa-cudnn"))]
            everywhere = [r for row in shapes.values() if (r := ratio(row, p, "sdpa-flash"))]
            if at_scale or everywhere:
                lines.append(f"- {mode} {short(p)}: ÷ sdpa-cudnn at N >= 4096 {spread(at_scale)}; "
                             f"÷ sdpa-flash {spread(everywhere)}")
    for mode in ("fwd", "bwd"):  # D: issue 18 asks for >= 1.0x the best SDPA backend on each row
        for d in row_dims:
            rows = [row for key, row in by_shape(results, mode).items() if key[1] == d]
            vs = [r for row in rows if (top := best(row, "sdpa")) and (r := ratio(row, "flashcourse", top))]
            lines.append(f"- {mode} d = {d}: default ÷ the best SDPA backend of each row {spread(vs)}")
    for r in extra.get("long_context") or []:
        cudnn = next((c for c in extra["long_context"] if c["provider"] == "sdpa-cudnn" and c["tflops"]), None)
        if r["tflops"] is None:
            lines.append(f"- long context {short(r['provider'])}: {r['status']}")
            continue
        vs = f", ÷ cudnn {r['tflops'] / cudnn['tflops']:.2f}" if cudnn and r["provider"] != "sdpa-cudnn" else ""
        lines.append(f"- long context {short(r['provider'])}: {r['tflops']:.0f} TFLOP/s{vs}, "
                     f"peak {bench.fmt_value(r['peak_over_io'], '.3f')}× the IO bytes")
    return lines


def report(results, prov: dict, extra: dict, grid_dims, row_dims) -> str:
    """The tables and the decisions, with where they were measured."""
    parts = [f"# Issue 18 experiments on {prov['device']}",
             f"torch {prov['torch']}, triton {prov['triton']}, CUDA {prov.get('cuda')}, driver {prov.get('driver')}, "
             f"commit {prov.get('git_commit') or extra.get('commit')}, {prov['date']}, {extra.get('seconds')} s"]
    for mode, what in (("fwd", "A. forward"), ("bwd", "B. backward")):
        parts.append(f"## {what} (TFLOP/s; ×: ÷ the default of the same shape)\n\n{table(results, mode, grid_dims)}")
    if extra.get("long_context"):
        parts.append("## C. long context (fwd+bwd)\n\n" + table(results, "fwd+bwd", row_dims + grid_dims))
    for mode in ("fwd", "bwd"):
        parts.append(f"## D. {mode}, other head dims\n\n{table(results, mode, row_dims)}")
    problems = [p for p in extra.get("precompile", []) if p["problem"]]
    if problems:
        parts.append("## Did not compile or run while precompiling\n\n" + "\n".join(
            f"- {p['variant']} {p['mode']} {p['dtype']} d={p['d']} causal={p['causal']}: {p['problem']}"
            for p in problems))
    if extra.get("not_started"):
        parts.append("## Not started (time budget)\n\n" + "\n".join(f"- {s}" for s in extra["not_started"]))
    # last, so that it ends the printed output
    parts.append("## Decisions\n\n" + "\n".join(decisions(results, grid_dims, row_dims, extra)))
    return "\n\n".join(parts) + "\n"


def progress_line(found, seconds: float) -> str:
    m = found[0]
    cells = [f"{short(x.provider)} {x.tflops:.0f}" if x.status == "ok" else f"{short(x.provider)} {x.status}"
             for x in found]
    return (f"[{seconds:5.0f} s] {m.mode} {m.dtype} d={m.d} N={m.N}{' causal' if m.causal else ''}: "
            + ", ".join(cells))


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory for the files (on the device: $OUT)")
    p.add_argument("--quick", action="store_true", help="toy sizes: every part and kind of variant, CPU or GPU")
    p.add_argument("--budget", type=float, help="seconds for the whole run, compiling included [480; quick: no limit]")
    p.add_argument("--precompile", type=int, default=14, metavar="PROCS",
                   help="processes that compile the kernels first (GPU) [14; 0: off]")
    p.add_argument("--name", help="file stem [perf-CARD: perf-h100, perf-h200, ...]")
    p.add_argument("--commit", help="git commit of the code, recorded when the checkout has no .git")
    p.add_argument("--progress", action="store_true", help="flashcourse.bench's progress bars too")
    a = p.parse_args(argv)
    import torch

    sizes = SIZES["quick" if a.quick else "full"]
    budget = a.budget or (480 if not a.quick else 1e9)
    run = Run(budget, sizes["timing"], a.progress)
    command = "python3 benchmarks/perf_experiments.py OUT" + (" --quick" if a.quick else "")
    prov = bench.provenance(command)
    name = a.name or f"perf-{card_name(prov['device'])}"
    grid_dims, row_dims = sizes["grid"]["head_dims"], sizes["rows"]["head_dims"]
    extra = dict(commit=a.commit, plan="quick" if a.quick else "full", budget_s=budget, tunings=run.tunings,
                 variants={v.name: v._asdict() for d in grid_dims for v in sum(variants_for(d, a.quick), [])},
                 precompile=[], not_started=[])

    def save(final: bool = False) -> None:
        """The files so far (after every shape: a run cut short keeps what it measured)."""
        extra["seconds"] = run.seconds()
        try:
            bench.save(run.results, a.out, name, command=command, extra=extra, plot_file=final and not a.quick)
        except Exception as exc:  # keep measuring: the next shape saves again
            print(f"saving failed: {type(exc).__name__}: {exc}", flush=True)

    def record(part: str, final: bool = False) -> None:
        save(final)
        print(f"[{extra['seconds']:5.0f} s] {part} done; files under {a.out}", flush=True)

    if torch.cuda.is_available() and a.precompile > 0:
        jobs = compile_jobs(sizes, a.quick)
        print(f"compiling: {len(jobs)} jobs in {a.precompile} processes on {prov['device']}", flush=True)
        outcome = precompile(jobs, a.precompile, run.until("precompile"))
        extra["precompile"] = [dict(variant=j.variant.name, mode=j.mode, dtype=j.dtype, d=j.d, causal=j.causal,
                                    problem=problem) for j, problem in outcome]
        print(f"{sum(bool(problem) for _, problem in outcome)} of {len(jobs)} jobs did not compile or run", flush=True)
        record("compiling")

    def shapes(part: str, measurements) -> None:
        """Every shape of ``part``, each (our variants, SDPA backends, mode) of ``measurements(d)`` on it."""
        for dtype, d, causal, N in grid_shapes(sizes[part]):
            if time.perf_counter() > run.until(part):
                extra["not_started"].append(f"{part}: {dtype} d={d} causal={causal} N={N}")
                continue
            for variants, sdpa, mode in measurements(d):
                found = run.measure(variants, sdpa, mode, shape_spec(sizes[part], dtype, d, causal, N))
                print(progress_line(found, run.seconds()), flush=True)
            save()

    print("A, B: the grid, forward and backward", flush=True)
    shapes("grid", lambda d: [(variants_for(d, a.quick)[0], SDPA, "fwd"), (variants_for(d, a.quick)[1], SDPA, "bwd")])
    record("A, B")

    print("C: long context", flush=True)
    if time.perf_counter() + (0 if a.quick else LONG_SECONDS) <= run.until("long"):
        long = [DEFAULT, ATOMIC] + [v for v in variants_for(sizes["long"]["head_dims"][0], a.quick)[1] if v.needs_gpu]
        found = run.measure(long, ["sdpa-cudnn"], "fwd+bwd", sizes["long"])
        print(progress_line(found, run.seconds()), flush=True)
        extra["long_context"] = long_context_rows(found)
    else:
        extra["not_started"].append("long context (time budget)")
    record("C")

    print("D: d = 96 and 256", flush=True)
    shapes("rows", lambda d: [([DEFAULT], ROW_SDPA, "fwd"), ([DEFAULT, ATOMIC], ROW_SDPA, "bwd")])
    extra["seconds"] = run.seconds()
    text = report(run.results, prov, extra, grid_dims, row_dims)
    extra["tables"] = text
    record("D", final=True)
    Path(a.out, f"{name}.md").write_text(text)
    bad = [m for m in run.results if m.status in ("failed", "error")]
    if bad:
        print(f"{len(bad)} measurement(s) failed their check or raised:\n" + bench.format_results(bad))
    print("\n" + text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
