"""The recorded run of issue 7, in one process on one GPU (about 5 minutes on an H100).

1. grid: fp16 and bf16, d in {64, 128}, causal and not, N in {1024, 4096, 16384}, fwd and bwd,
   B·N = 16k tokens and H·d = 2048; flashcourse against sdpa-flash, sdpa-cudnn and sdpa-efficient.
2. long context: B=1, H=16, d=128, N=131072, causal, fwd+bwd, fp16; flashcourse (and the SDPA
   backends for comparison); peak memory against 1.25 × the bytes of q, k, v, o, dO, dq, dk, dv.
3. where naive attention runs out of memory on that shape: N = 4096, 8192, ... until it does.

Every measurement is checked against float64 naive attention before it is timed (flashcourse.bench).
Files under OUT_DIR: h100.json (provenance, results, ratios, long-context and naive summaries),
h100.csv, h100.png, h100.txt (the full table), summary.md (the tables quoted in the notes); the first
three are rewritten after each part, so a run cut short still leaves what it measured. Printed: the
measurements that are not ok, then the summary, the ratio table last.

    python3 benchmarks/run_h100.py OUT_DIR            # the recorded run
    python3 benchmarks/run_h100.py OUT_DIR --tiny     # the same code paths at toy sizes (CPU or GPU)
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a bare checkout

import flashcourse  # noqa: E402  (before triton: on a CPU it switches the interpreter on)
from flashcourse import bench  # noqa: E402

GRID_PROVIDERS = ["flashcourse", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
LONG_PROVIDERS = ["flashcourse", "sdpa-flash", "sdpa-cudnn"]
MEMORY_LIMIT = 1.25  # peak memory of the long-context fwd+bwd, in units of the bytes of its 8 tensors

PLANS = {
    "full": dict(
        grid=dict(dtypes=["float16", "bfloat16"], head_dims=[64, 128], causal=[False, True],
                  seqlens=[1024, 4096, 16384]),
        long=dict(dtypes=["float16"], head_dims=[128], causal=[True], seqlens=[131072], batch=1, heads=16),
        naive_seqlens=[4096 * 2**i for i in range(6)],  # 4096 ... 131072
        warmup_ms=25, rep_ms=100,
    ),
    # toy sizes through every code path: runs on the CPU (interpreted kernels) in about 15 s
    "tiny": dict(
        grid=dict(dtypes=["float16", "bfloat16"], head_dims=[32], causal=[False, True], seqlens=[64],
                  batch=1, heads=2),
        long=dict(dtypes=["float16"], head_dims=[32], causal=[True], seqlens=[128], batch=1, heads=2),
        naive_seqlens=[64, 128],
        warmup_ms=0, rep_ms=1,
    ),
}


def long_context_summary(results):
    """Peak memory of each long-context provider against MEMORY_LIMIT × the bytes of its 8 tensors."""
    rows = []
    for m in results:
        row = dict(provider=m.provider, N=m.N, status=m.status, ms=m.ms, tflops=m.tflops, peak_mib=m.peak_mib,
                   io_mib=bench.io_bytes(m.B, m.H, m.N, m.d, bench.DTYPES[m.dtype], m.mode) / 2**20,
                   peak_over_io=m.peak_over_io)
        row["under_limit"] = None if m.peak_over_io is None else m.peak_over_io <= MEMORY_LIMIT
        rows.append(row)
    return rows


def naive_oom_search(plan, common, deadline):
    """Naive attention on the long-context shape at growing N, per mode, until it runs out of memory."""
    results, first_oom, alive = [], {}, ["fwd", "fwd+bwd"]
    for N in plan["naive_seqlens"]:
        if not alive or time.perf_counter() > deadline:
            break
        ms = bench.benchmark(providers=["naive"], modes=alive, **dict(plan["long"], seqlens=[N]), **common)
        results += ms
        for m in ms:
            if m.status == "oom":
                first_oom[m.mode] = N
        alive = [mode for mode in alive if mode not in first_oom]
    return results, first_oom


def format_long(rows, naive, first_oom):
    """The long-context table, then where naive attention ran out of memory (from its measurements)."""
    lines = [
        f"| provider | N | status | ms | TFLOP/s | peak MiB | q,k,v,o,dO,dq,dk,dv MiB | peak / those | under {MEMORY_LIMIT}x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        under = {True: "yes", False: "NO", None: "n/a"}[r["under_limit"]]
        lines.append(
            f"| {r['provider']} | {r['N']} | {r['status']} | {bench.fmt_value(r['ms'], '.1f')} | {bench.fmt_value(r['tflops'], '.1f')} "
            f"| {bench.fmt_value(r['peak_mib'], '.0f')} | {r['io_mib']:.4g} | {bench.fmt_value(r['peak_over_io'], '.3f')} | {under} |"
        )
    for mode in ("fwd", "fwd+bwd"):
        ran = [m.N for m in naive if m.mode == mode and m.status == "ok"]
        where = f"runs out of memory at N = {first_oom[mode]}" if mode in first_oom else "did not run out of memory"
        lines.append(f"\nnaive attention, {mode}, on that shape: {where} (ran at N = {', '.join(map(str, ran)) or 'none'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory for the files (on the device: $OUT)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: test every code path quickly, CPU or GPU")
    p.add_argument("--grid-budget", type=float, default=330,
                   help="seconds for part 1 with its compiling; shapes not started by then are skipped [330]")
    p.add_argument("--precompile", type=int, default=None, metavar="PROCS",
                   help="processes that compile the Triton kernels before part 1 [8; 2 with --tiny; 0: off]")
    p.add_argument("--commit", default=None, help="git commit of the code, recorded in the provenance")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    plan = PLANS["tiny" if a.tiny else "full"]
    common = dict(warmup_ms=plan["warmup_ms"], rep_ms=plan["rep_ms"], progress=not a.quiet)
    command = "python3 benchmarks/run_h100.py OUT" + (" --tiny" if a.tiny else "")
    t0 = time.perf_counter()
    results, extra = [], {"commit": a.commit, "plan": "tiny" if a.tiny else "full"}

    def record(part: str):
        extra["seconds"] = round(time.perf_counter() - t0, 1)
        try:
            bench.save(results, a.out, "h100", command=command, extra=extra)
        except Exception as exc:  # keep measuring: the next part saves again
            print(f"saving after {part} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"[{extra['seconds']:.0f} s] {part} done; files under {a.out}", flush=True)

    print("part 1: the grid (first compiling the Triton kernels in parallel processes)", flush=True)
    procs = a.precompile if a.precompile is not None else (2 if a.tiny else 8)
    grid = bench.benchmark(providers=GRID_PROVIDERS, modes=["fwd", "bwd"], **plan["grid"],
                           time_budget_s=a.grid_budget, precompile_processes=procs, **common)
    results += grid
    record("grid")

    print("part 2: long context", flush=True)
    long = bench.benchmark(providers=LONG_PROVIDERS, modes=["fwd+bwd"], **plan["long"], **common)
    results += long
    extra["long_context"] = long_context_summary(long)
    record("long context")

    print("part 3: where naive attention runs out of memory", flush=True)
    naive, first_oom = naive_oom_search(plan, common, deadline=t0 + 450)
    results += naive
    extra["naive_first_oom_N"] = first_oom
    record("naive search")

    long_text = format_long(extra["long_context"], naive, first_oom)
    ratios = bench.format_ratios(bench.ratio_table(results))
    lc = plan["long"]
    shape = f"B={lc['batch']}, H={lc['heads']}, d={lc['head_dims'][0]}"
    summary = (
        f"# flashcourse bench on {bench.provenance(command)['device']}\n\n"
        f"## Long context (fwd+bwd, causal, {plan['long']['dtypes'][0]}, {shape})\n\n{long_text}\n\n"
        f"## flashcourse TFLOP/s and its ratio to each SDPA backend (same run)\n\n{ratios}\n"
    )
    Path(a.out, "summary.md").write_text(summary)
    table = bench.format_results(results)
    Path(a.out, "h100.txt").write_text(table + "\n")
    not_ok = [m for m in results if m.status != "ok"]
    print(f"{len(results) - len(not_ok)} of {len(results)} measurements ok; the others:")
    print(bench.format_results(not_ok))
    print()
    print(summary)
    bad = [m for m in results if m.status in ("failed", "error")]
    if bad:
        print(f"{len(bad)} measurement(s) failed their check or raised: see the status column above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
