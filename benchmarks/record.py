"""The recorded run, on whatever GPU the machine has, in one process (about 5–6 minutes on an H100).

1. grid: fp16 and bf16, d ∈ {64, 128}, causal and not, N ∈ {1024, 4096, 16384}, fwd and bwd,
   B·N = 16k tokens and H·d = 2048; flashcourse and every SDPA backend (flash, cuDNN, efficient, math).
2. long context: B = 1, H = 16, d = 128, N = 131072, causal, fp16, fwd+bwd; flashcourse, sdpa-flash
   and sdpa-cudnn; peak memory against the bytes of q, k, v, o, dO, dq, dk, dv.
3. where naive attention runs out of memory on that shape: N = 4096, 8192, ... until it does.

Every measurement is checked against float64 naive attention before it is timed (flashcourse.bench).
Files under OUT, named after the card (h100, h200, ...; ``--name``): NAME.json (provenance, results,
ratios, long-context and naive summaries), NAME.csv, NAME.png, NAME.txt (the full table) and
summary.md. The first three are rewritten after each part, so a run cut short keeps what it measured.
Whether the numbers meet the issues' targets: ``python3 benchmarks/check_targets.py OUT/NAME.json``.

    python3 benchmarks/record.py OUT              # the recorded run
    python3 benchmarks/record.py OUT --tiny       # every part at toy sizes (CPU or GPU), for the tests
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a bare checkout

import flashcourse  # noqa: E402,F401  (before triton: on a CPU it switches the interpreter on)
from flashcourse import bench  # noqa: E402
from flashcourse.bench.report import card_name  # noqa: E402

GRID_PROVIDERS = ["flashcourse", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
LONG_PROVIDERS = ["flashcourse", "sdpa-flash", "sdpa-cudnn"]

SIZES = {
    "full": dict(
        grid=dict(dtypes=["float16", "bfloat16"], head_dims=[64, 128], causal=[False, True],
                  seqlens=[1024, 4096, 16384], tokens=16384, hidden=2048),
        long=dict(dtypes=["float16"], head_dims=[128], causal=[True], seqlens=[131072], batch=1, heads=16),
        naive_seqlens=[4096 * 2**i for i in range(6)],  # 4096 ... 131072
        timing=dict(warmup_ms=25, rep_ms=100),
    ),
    # toy sizes through every code path: runs on the CPU (interpreted kernels) too
    "tiny": dict(
        grid=dict(dtypes=["float16", "bfloat16"], head_dims=[32], causal=[False, True], seqlens=[64],
                  batch=1, heads=2),
        long=dict(dtypes=["float16"], head_dims=[32], causal=[True], seqlens=[128], batch=1, heads=2),
        naive_seqlens=[64, 128],
        timing=dict(warmup_ms=0, rep_ms=1, min_runs=1),
    ),
}


def long_context_rows(results):
    """One row per long-context provider: time, TFLOP/s, and peak memory against the bytes it must hold."""
    return [dict(provider=m.provider, N=m.N, status=m.status, ms=m.ms, tflops=m.tflops, peak_mib=m.peak_mib,
                 io_mib=bench.io_bytes(m.B, m.H, m.N, m.d, bench.DTYPES[m.dtype], m.mode) / 2**20,
                 peak_over_io=m.peak_over_io) for m in results]


def naive_oom_search(sizes, timing, progress, deadline):
    """Naive attention on the long-context shape at growing N, per mode, until it runs out of memory."""
    results, first_oom, alive = [], {}, ["fwd", "fwd+bwd"]
    for N in sizes["naive_seqlens"]:
        if not alive or time.perf_counter() > deadline:
            break
        found = bench.benchmark(providers=["naive"], modes=alive, **{**sizes["long"], "seqlens": [N]}, **timing,
                                progress=progress)
        results += found
        first_oom.update({m.mode: N for m in found if m.status == "oom"})
        alive = [mode for mode in alive if mode not in first_oom]
    return results, first_oom


def format_long(rows, naive, first_oom) -> str:
    """The long-context table, then where naive attention ran out of memory."""
    f = bench.fmt_value
    lines = ["| provider | N | status | ms | TFLOP/s | peak MiB | q,k,v,o,dO,dq,dk,dv MiB | peak / those |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['provider']} | {r['N']} | {r['status']} | {f(r['ms'], '.1f')} | {f(r['tflops'], '.1f')} "
              f"| {f(r['peak_mib'], '.0f')} | {r['io_mib']:.4g} | {f(r['peak_over_io'], '.3f')} |" for r in rows]
    for mode in ("fwd", "fwd+bwd"):
        ran = ", ".join(str(m.N) for m in naive if m.mode == mode and m.status == "ok") or "none"
        where = f"runs out of memory at N = {first_oom[mode]}" if mode in first_oom else "did not run out of memory"
        lines.append(f"\nnaive attention, {mode}, on that shape: {where} (ran at N = {ran})")
    return "\n".join(lines)


def summary(prov, sizes, long_text, results) -> str:
    lc = sizes["long"]
    shape = f"B={lc['batch']}, H={lc['heads']}, d={lc['head_dims'][0]}, causal, {lc['dtypes'][0]}"
    return (f"# flashcourse bench on {prov['device']}\n\n"
            f"driver {prov.get('driver')}, CUDA {prov.get('cuda')}, torch {prov['torch']}, triton {prov['triton']}, "
            f"commit {prov.get('git_commit')}, {prov['date']}\n\n"
            f"## Long context (fwd+bwd, {shape})\n\n{long_text}\n\n"
            f"## flashcourse TFLOP/s and its ratio to each SDPA backend (same run)\n\n"
            f"{bench.format_ratios(bench.ratio_table(results))}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory for the files (on the device: $OUT)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every code path quickly, CPU or GPU")
    p.add_argument("--name", help="file stem [the card: h100, h200, ...; cpu]")
    p.add_argument("--grid-budget", type=float, default=360,
                   help="seconds for part 1 with its compiling; shapes not started by then are skipped [360]")
    p.add_argument("--precompile", type=int, default=8, metavar="PROCS",
                   help="processes that compile the Triton kernels before part 1 [8; 0: off]")
    p.add_argument("--commit", help="git commit of the code, recorded when the checkout has no .git")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    sizes = SIZES["tiny" if a.tiny else "full"]
    progress = not a.quiet
    command = "python3 benchmarks/record.py OUT" + (" --tiny" if a.tiny else "")
    prov = bench.provenance(command)
    name = a.name or card_name(prov["device"])
    t0 = time.perf_counter()
    results, extra = [], {"commit": a.commit, "plan": "tiny" if a.tiny else "full"}

    def record(part: str):
        extra["seconds"] = round(time.perf_counter() - t0, 1)
        try:
            bench.save(results, a.out, name, command=command, extra=extra)
        except Exception as exc:  # keep measuring: the next part saves again
            print(f"saving after {part} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"[{extra['seconds']:.0f} s] {part} done; files under {a.out}", flush=True)

    print(f"part 1: the grid on {prov['device']} (compiling the Triton kernels first)", flush=True)
    results += bench.benchmark(providers=GRID_PROVIDERS, modes=["fwd", "bwd"], **sizes["grid"], **sizes["timing"],
                               time_budget_s=a.grid_budget, precompile_processes=a.precompile, progress=progress)
    record("grid")

    print("part 2: long context", flush=True)
    long = bench.benchmark(providers=LONG_PROVIDERS, modes=["fwd+bwd"], **sizes["long"], **sizes["timing"],
                           progress=progress)
    results += long
    extra["long_context"] = long_context_rows(long)
    record("long context")

    print("part 3: where naive attention runs out of memory", flush=True)
    naive, extra["naive_first_oom_N"] = naive_oom_search(sizes, sizes["timing"], progress, deadline=t0 + 480)
    results += naive
    record("naive search")

    text = summary(prov, sizes, format_long(extra["long_context"], naive, extra["naive_first_oom_N"]), results)
    Path(a.out, "summary.md").write_text(text)
    Path(a.out, f"{name}.txt").write_text(bench.format_results(results) + "\n")
    not_ok = [m for m in results if m.status != "ok"]
    print(f"{len(results) - len(not_ok)} of {len(results)} measurements ok; the others:")
    print(bench.format_results(not_ok) + "\n\n" + text)
    bad = [m for m in results if m.status in ("failed", "error")]
    if bad:
        print(f"{len(bad)} measurement(s) failed their check or raised: see the status column above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
