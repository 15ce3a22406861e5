"""``flashcourse.bench``: time attention implementations side by side, each checked first.

Read it in this order:

- ``plan.py``       what to run (``Plan``: providers, modes, a grid of shapes, options) and what came
                    out (``Measurement``: one per provider × mode × shape).
- ``providers.py``  who is measured: flashcourse's Triton kernels, tiled, naive, each SDPA backend.
- ``check.py``      the check before timing: output and gradients against float64 naive attention.
- ``measure.py``    how a number is made: ``time_ms``, ``peak_memory``, FLOP and byte counts.
- ``run.py``        the engine: ``benchmark(plan)``; an exception becomes a status and the run goes on.
- ``tuning.py``     per-config timing: flashcourse with each launch config of its autotuner pinned.
- ``report.py``     provenance, files (JSON, CSV, PNG), tables, the figure; ``load`` for recorded runs.
- ``cli.py``        ``flashcourse bench``.

    from flashcourse import bench
    results = bench.benchmark(providers=["flashcourse", "sdpa-flash"], modes=["fwd"], seqlens=[1024, 4096])
    print(bench.format_results(results)); print(bench.format_ratios(bench.ratio_table(results)))
    bench.save(results, "bench-results")          # bench.json, bench.csv, bench.png
    bench.time_ms(lambda: q @ k.mT)               # median ms of any step, GPU or CPU

Sizes follow the FlashAttention papers (B·N = 16k tokens, H·d = 2048) unless given; on the CPU the
defaults are toy sizes. Acceptance targets against other implementations are not here: see
``benchmarks/check_targets.py``.
"""

from .check import TOLERANCE, rel_err
from .cli import main
from .measure import attention_flops, io_bytes, make_step, peak_memory, time_ms
from .plan import DEFAULTS, DTYPES, MODES, Measurement, Plan, Shape, default_batch_heads, make_plan
from .providers import PROVIDERS, Unavailable
from .report import fmt_value, format_ratios, format_results, load, plot, provenance, ratio_table, save
from .run import benchmark, classify

__all__ = [
    "DEFAULTS", "DTYPES", "MODES", "PROVIDERS", "TOLERANCE", "Measurement", "Plan", "Shape", "Unavailable",
    "attention_flops", "benchmark", "classify", "default_batch_heads", "fmt_value", "format_ratios",
    "format_results", "io_bytes", "load", "main", "make_plan", "make_step", "peak_memory", "plot",
    "provenance", "rel_err", "ratio_table", "save", "time_ms",
]
