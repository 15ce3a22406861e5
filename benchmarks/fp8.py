"""The FP8 forward against our own bf16 forward, in one run, and what FP8 costs in accuracy (issue 19).

1. speed: d ∈ {64, 128}, causal and not, N ∈ {1024, 4096, 16384}, B·N = 16k tokens, H·d = 2048.
   bf16: ``flash_attention`` as the package runs it (autotuned). FP8: the forward kernel on inputs
   already in e4m3 (per-block scales, v key-major), each launch configuration of
   ``configs.CANDIDATES["forward"][(d, 1)]`` pinned and timed, the fastest reported; the quantization
   (``fp8.quantize_attention_inputs``) timed on its own. TFLOP/s = 4·B·H·N²·d / time, half when
   causal. Target: FP8 >= 1.3× bf16 at N >= 4096. Each output is checked against bf16's first.
2. error: random inputs, plain and with outlier channels (4 channels of q and k × 20), d = 64 and
   128; per-tensor and per-block scales, with and without the Hadamard rotation: the FP8 kernel's
   error against float64 attention, the reference's (float32 on the same e4m3 inputs; the rule is
   kernel <= 2 × reference) and the bf16 kernel's.

Files under OUT: fp8_<card>.json (provenance, both tables) and fp8_<card>.md, rewritten after each
part; the summary table is printed last. Kernels are compiled first in parallel processes.

    python3 benchmarks/fp8.py OUT            # a GPU with FP8 tensor cores: about 3 minutes on an H100
    python3 benchmarks/fp8.py OUT --tiny     # toy sizes through every code path (also in the CPU interpreter)
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a bare checkout

import flashcourse  # noqa: E402  (before triton: on a CPU it switches the interpreter on)
import torch  # noqa: E402

from flashcourse import bench, fp8  # noqa: E402
from flashcourse.bench.report import card_name  # noqa: E402
from flashcourse.kernels import configs  # noqa: E402
from flashcourse.kernels.forward import attention_forward  # noqa: E402

SIZES = {
    "full": dict(head_dims=[64, 128], causal=[False, True], seqlens=[1024, 4096, 16384], tokens=16384, hidden=2048,
                 timing=dict(warmup_ms=25, rep_ms=100), error=dict(B=2, H=8, N=2048)),
    "tiny": dict(head_dims=[64], causal=[False, True], seqlens=[128], tokens=128, hidden=128,
                 timing=dict(warmup_ms=0, rep_ms=1, min_runs=1), error=dict(B=1, H=1, N=128)),
}
TARGET = 1.3  # FP8 / bf16 TFLOP/s at N >= 4096
SANITY = 0.2  # largest ‖O_fp8 − O_bf16‖ / ‖O_bf16‖ before timing (e4m3 inputs cost about 0.05)


def fp8_configs(d: int, tiny: bool) -> list:
    """The FP8 launch configurations timed at head dim d: each candidate with descriptor loads, and
    the first with pointer loads too (the fallback the autotuner also tries)."""
    shapes = configs.CANDIDATES["forward"][(d, 1)][: 1 if tiny else None]
    return [configs.KernelConfig(*s, use_tma=True) for s in shapes] + [configs.KernelConfig(*shapes[0], use_tma=False)]


def label(c) -> str:
    return f"{c.block_m},{c.block_n},{c.num_warps},{c.num_stages}" + (",tma" if c.use_tma else "")


def qkv(B, H, N, d, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, H, N, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3)]


def run_fp8(inputs, causal, config):
    return attention_forward(inputs.q, inputs.k, inputs.v, causal=causal, scale=inputs.q.shape[-1] ** -0.5,
                             descale=inputs[3:], config=config)[0]


def _compile(job) -> str:
    """Compile one (d, causal) group at a small size (the same specialisations as the timed sizes)."""
    d, causal, device = job
    try:
        q, k, v = qkv(2, 2048 // d, 256, d, device)
        flashcourse.flash_attention(q, k, v, causal=causal)
        inputs = fp8.quantize_attention_inputs(q, k, v)
        for c in fp8_configs(d, tiny=False):
            run_fp8(inputs, causal, c)
        torch.cuda.synchronize()
    except Exception as exc:  # the timed run meets (and records) the same error
        return f"d={d} causal={causal}: {type(exc).__name__}: {str(exc)[:300]}"
    return ""


def precompile(sizes, device) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(d, c, device) for d in sizes["head_dims"] for c in sizes["causal"]]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for problem in pool.map(_compile, jobs):
            if problem:
                print(f"precompiling failed for {problem}", flush=True)


def speed(sizes, device, deadline, tiny) -> list:
    """One row per (d, causal, N): bf16 and each FP8 configuration, ms and TFLOP/s."""
    rows = []
    timing = sizes["timing"]
    # the shapes of the target (N >= 4096) first, in case the time budget runs out
    shapes = sorted(((d, c, N) for d in sizes["head_dims"] for c in sizes["causal"] for N in sizes["seqlens"]),
                    key=lambda s: (s[2] < 4096, s))
    for d, causal, N in shapes:
        B, H = bench.default_batch_heads(N, d, sizes["tokens"], sizes["hidden"])
        flops = bench.attention_flops(B, H, N, d, causal)
        row = dict(d=d, causal=causal, N=N, B=B, H=H, flops=flops)
        rows.append(row)
        if time.perf_counter() > deadline:
            row["status"] = "skipped (time budget)"
            continue
        q, k, v = qkv(B, H, N, d, device, seed=N + d)
        with torch.no_grad():
            o_bf16 = flashcourse.flash_attention(q, k, v, causal=causal)
            ms = bench.time_ms(lambda: flashcourse.flash_attention(q, k, v, causal=causal), **timing)
            row["bf16"] = dict(ms=ms, tflops=flops / ms / 1e9)
            inputs = fp8.quantize_attention_inputs(q, k, v)
            row["quantize_ms"] = bench.time_ms(lambda: fp8.quantize_attention_inputs(q, k, v), **timing)
            row["fp8"] = []
            for c in fp8_configs(d, tiny):
                row["fp8"].append(_time_config(inputs, causal, c, o_bf16, flops, timing))
        ok = [r for r in row["fp8"] if r["status"] == "ok"]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            row.update(fp8_best=best, speedup=row["bf16"]["ms"] / best["ms"],
                       speedup_with_quantize=row["bf16"]["ms"] / (best["ms"] + row["quantize_ms"]),
                       status="ok")
        else:
            row["status"] = "fp8 failed: " + "; ".join(r["status"] for r in row["fp8"])
        print(f"  d={d} causal={causal!s:5} N={N:5}: bf16 {row['bf16']['tflops']:6.1f} TFLOP/s, FP8 "
              + (f"{row['fp8_best']['tflops']:6.1f} ({row['fp8_best']['config']}), "
                 f"{row['speedup']:.2f}x" if ok else row["status"]), flush=True)
        del q, k, v, inputs, o_bf16
    return sorted(rows, key=lambda r: (r["d"], r["causal"], r["N"]))


def _time_config(inputs, causal, config, o_bf16, flops, timing) -> dict:
    result = dict(config=label(config))
    try:
        err = bench.rel_err(run_fp8(inputs, causal, config), o_bf16)
        if err > SANITY:
            return dict(result, status=f"wrong: error {err:.3g} against bf16")
        ms = bench.time_ms(lambda: run_fp8(inputs, causal, config), **timing)
    except Exception as exc:  # one configuration that cannot compile or launch does not stop the run
        return dict(result, status=f"{type(exc).__name__}: {str(exc)[:200]}")
    return dict(result, ms=ms, tflops=flops / ms / 1e9, error_vs_bf16=err, status="ok")


def errors(sizes, device, best_config) -> list:
    """The error table: data × d × scaling × rotation; the FP8 kernel, the reference, the bf16 kernel."""
    rows = []
    for data, channels in (("plain", 0), ("outlier channels", 4)):
        for d in sizes["head_dims"]:
            q, k, v = fp8.outlier_inputs(**sizes["error"], d=d, channels=channels, factor=20.0, seed=d,
                                         device=device, dtype=torch.bfloat16)
            exact = flashcourse.naive_attention(q.double(), k.double(), v.double())
            with torch.no_grad():
                bf16 = bench.rel_err(flashcourse.flash_attention(q, k, v), exact)
                for scaling in fp8.SCALINGS:
                    for rotate in (False, True):
                        inputs = fp8.quantize_attention_inputs(q, k, v, scaling=scaling, rotate_qk=rotate)
                        ref = bench.rel_err(fp8.reference_attention(inputs), exact)
                        row = dict(data=data, d=d, scaling=scaling, rotate=rotate, reference=ref, bf16_kernel=bf16)
                        try:
                            mine = bench.rel_err(run_fp8(inputs, False, best_config[d]), exact)
                            rows.append(dict(row, fp8_kernel=mine, ratio=mine / ref))
                        except Exception as exc:  # recorded; the table goes on
                            rows.append(dict(row, fp8_kernel=None, ratio=None, status=f"{type(exc).__name__}: "
                                                                                       f"{str(exc)[:200]}"))
    return rows


def speed_table(rows) -> str:
    f = bench.fmt_value
    lines = ["| d | causal | N | B×H | bf16 TFLOP/s | FP8 TFLOP/s | FP8 config | FP8 / bf16 | with quantizing | "
             f"≥ {TARGET}× |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['d']} | {r['causal']} | {r['N']} | {r['B']}×{r['H']} | "
                         f"{f(r.get('bf16', {}).get('tflops'), '.1f')} | – | – | – | – | {r.get('status')} |")
            continue
        target = "yes" if r["speedup"] >= TARGET else "no"
        lines.append(f"| {r['d']} | {r['causal']} | {r['N']} | {r['B']}×{r['H']} | {r['bf16']['tflops']:.1f} | "
                     f"{r['fp8_best']['tflops']:.1f} | {r['fp8_best']['config']} | {r['speedup']:.2f}× | "
                     f"{r['speedup_with_quantize']:.2f}× | {target if r['N'] >= 4096 else '(N < 4096)'} |")
    return "\n".join(lines)


def error_table(rows) -> str:
    lines = ["| data | d | scales | rotation | FP8 kernel | reference (float32, same e4m3) | kernel / reference | "
             "bf16 kernel |", "|---|---|---|---|---|---|---|---|"]
    f = bench.fmt_value
    lines += [f"| {r['data']} | {r['d']} | {r['scaling']} | {'yes' if r['rotate'] else 'no'} | "
              f"{f(r['fp8_kernel'], '.4f') if r['fp8_kernel'] is not None else r['status']} | {r['reference']:.4f} | "
              f"{f(r['ratio'], '.2f')} | {r['bf16_kernel']:.4f} |" for r in rows]
    return "\n".join(lines)


def markdown(prov, speed_rows, error_rows) -> str:
    return (f"# FP8 forward on {prov['device']}\n\n"
            f"driver {prov.get('driver')}, CUDA {prov.get('cuda')}, torch {prov['torch']}, triton {prov['triton']}, "
            f"commit {prov.get('git_commit')}, {prov['date']}\n\n"
            f"## Speed: FP8 (inputs already e4m3, per-block scales) against bf16, same run\n\n"
            f"B·N = 16k tokens, H·d = 2048; TFLOP/s = 4·B·H·N²·d / time (half when causal); "
            f"'with quantizing' adds the time of quantizing q, k, v to the FP8 kernel's.\n\n"
            f"{speed_table(speed_rows)}\n\n"
            f"## Error against float64 attention (relative, ‖O − O₆₄‖ / ‖O₆₄‖), random inputs\n\n"
            f"{error_table(error_rows)}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory for the files (on the device: $OUT)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every code path quickly, CPU or GPU")
    p.add_argument("--name", help="file stem [fp8_<card>: fp8_h100, ...]")
    p.add_argument("--budget", type=float, default=210, help="seconds for compiling and part 1; later shapes "
                                                             "are skipped [210]")
    p.add_argument("--commit", help="git commit of the code, recorded when the checkout has no .git")
    a = p.parse_args(argv)
    sizes = SIZES["tiny" if a.tiny else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        fp8.check_fp8_device(device)
    command = "python3 benchmarks/fp8.py OUT" + (" --tiny" if a.tiny else "")
    prov = bench.provenance(command)
    name = a.name or f"fp8_{card_name(prov['device'])}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = dict(provenance=prov, commit=a.commit, plan="tiny" if a.tiny else "full", target=TARGET,
                  speed=[], errors=[])

    def save(part: str):
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out / f"{name}.md").write_text(markdown(prov, result["speed"], result["errors"]))
        print(f"[{result['seconds']:.0f} s] {part} done; files under {out}", flush=True)

    if device == "cuda" and not a.tiny:
        print(f"compiling the kernels on {prov['device']}", flush=True)
        precompile(sizes, device)
        save("compiling")
    print("part 1: speed", flush=True)
    result["speed"] = speed(sizes, device, t0 + a.budget, a.tiny)
    save("speed")
    print("part 2: error", flush=True)
    best = {}  # the fastest FP8 configuration per d (non-causal, longest N measured)
    for r in result["speed"]:
        if r.get("status") == "ok" and not r["causal"]:
            best[r["d"]] = configs.parse_config(r["fp8_best"]["config"])
    result["errors"] = errors(sizes, device, {d: best.get(d, fp8_configs(d, a.tiny)[0]) for d in sizes["head_dims"]})
    save("error")
    print(f"\n{markdown(prov, result['speed'], result['errors'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
