"""flash-attn's options on a GPU: accuracy at real sizes, the plain grid against the previous kernels, windows.

    PYTHONPATH=. python benchmarks/check_options_gpu.py --out DIR [--part accuracy grid windows]
                    [--old PATH] [--repeats 3] [--quick]

Parts (each writes DIR/<part>.json and DIR/<part>.md, with the device, versions and commit):

- accuracy: every option (windows, soft-capping, ALiBi (H,) and (B, H), dropout, all together) on
  B=2, H=8, Hkv=2, N=2048, d=128, causal, in fp16, bf16 and fp32 (IEEE: PyTorch's default precision),
  forward and backward, against float64 (tests/flash_reference.py), with flash-attn's rule: max error
  <= 2 × that of the same reference computed in the inputs' dtype + 1e-5. Exit status 1 if one fails.
- grid: the plain kernels (no option) on the papers' grid: fp16 and bf16, d 64 and 128, causal and
  not, N 1024, 4096, 16384, B·N = 16k, H·d = 2048; forward and backward timed (triton do_bench median)
  with the same pinned configurations (PINNED) in the kernels of this checkout ("new") and, with
  ``--old PATH``, in those of another checkout of flashcourse ("old", e.g. the commit before this
  change: ``git worktree add /tmp/fc-old <commit>``); each in ``--repeats`` fresh processes,
  interleaved, and the median of those compared: new/old time ratios (<= 1.02 means not slower).
- windows: sliding-window causal attention (window (w, 0)) at fixed N = 16384 for w = 128 .. 8192,
  and at fixed w = 1024 for N = 4096 .. 32768: time per (N · w) stays flat, i.e. time ∝ N · w.

A configuration is pinned in every part (environment variables FLASHCOURSE_CONFIG_*), so that each
kernel compiles once per option set and dtype instead of autotuning. ``--quick`` runs a small subset
of each part (a smoke test, also on the CPU interpreter at tiny sizes).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (kernel, head dim) -> "B_r,B_c,warps,stages[,tma]": winners of the H100 runs (benchmarks/NOTES_*.md)
PINNED = {
    ("forward", 64): "128,64,4,3,tma",
    ("forward", 128): "128,64,4,2,tma",
    ("dkdv", 64): "32,128,4,4",
    ("dkdv", 128): "64,128,8,3",
    ("dq", 64): "128,64,8,3",
    ("dq", 128): "128,64,8,3",
}
# fits every dtype at d <= 128 (float32 included), for the accuracy part
PINNED_ANY = {"forward": "64,64,4,2", "dkdv": "32,64,4,2", "dq": "64,32,4,2"}


def pin(configs: dict) -> None:
    for kernel, config in configs.items():
        os.environ[f"FLASHCOURSE_CONFIG_{kernel.upper()}"] = config


def provenance() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), commit=commit,
    )


def write(out: str, part: str, rows: list, table: str, extra=None) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{part}.json"), "w") as f:
        json.dump(dict(provenance=provenance(), rows=rows, **(extra or {})), f, indent=1)
    with open(os.path.join(out, f"{part}.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)


def markdown(rows: list, columns: list) -> str:
    def cell(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# accuracy


def part_accuracy(args) -> bool:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from flash_reference import max_error, reference_attention

    from flashcourse import flash_attention

    pin(PINNED_ANY)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, Hkv, N, d = (2, 8, 2, 2048, 128) if not args.quick else (1, 2, 1, 64, 32)
    w = N // 8
    options = {
        "plain": {}, "causal": dict(causal=True), "window": dict(window_size=(w, w // 4)),
        "window-causal": dict(causal=True, window_size=(w, 0)), "softcap": dict(softcap=2.0),
        "alibi-H": dict(alibi_slopes="H"), "alibi-BH": dict(alibi_slopes="BH"), "dropout": dict(dropout_p=0.17),
        "all": dict(causal=True, window_size=(w, 0), softcap=2.0, alibi_slopes="BH", dropout_p=0.1),
    }
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if not args.quick else [torch.float16]
    rows, ok = [], True
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        q, k, v, do = (torch.randn(shape, generator=g, device=device).to(dtype)
                       for shape in ((B, H, N, d), (B, Hkv, N, d), (B, Hkv, N, d), (B, H, N, d)))
        for name, opts in options.items():
            opts = dict(opts)
            if isinstance(opts.get("alibi_slopes"), str):
                opts["alibi_slopes"] = torch.rand((H,) if opts["alibi_slopes"] == "H" else (B, H), device=device) * 0.3
            t0 = time.perf_counter()
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o, _, probs = flash_attention(*leaves, return_attn_probs=True, **opts)
            got = (o, *torch.autograd.grad(o, leaves, do))
            keep = ~torch.signbit(probs) if opts.get("dropout_p", 0) > 0 else None
            del probs
            refs = []
            for ref_dtype in (torch.float64, dtype):
                ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                ref_o = reference_attention(*ref_leaves, keep=keep, dtype=ref_dtype, **opts)
                refs.append((ref_o, *torch.autograd.grad(ref_o, ref_leaves, do.to(ref_dtype))))
            row = dict(dtype=str(dtype).split(".")[1], option=name, seconds=time.perf_counter() - t0)
            for tensor, ours, exact, low in zip(("O", "dq", "dk", "dv"), got, refs[0], refs[1]):
                err, low_err = max_error(ours, exact), max_error(low, exact)
                row[f"{tensor}_err"], row[f"{tensor}_ref_err"] = err, low_err
                row[f"{tensor}_ok"] = err <= 2 * low_err + 1e-5
                ok &= row[f"{tensor}_ok"]
            rows.append(row)
            print(row, flush=True)
            del got, refs, keep
            if device == "cuda":
                torch.cuda.empty_cache()
    columns = ["dtype", "option"] + [f"{t}_{s}" for t in ("O", "dq", "dk", "dv") for s in ("err", "ref_err", "ok")]
    write(args.out, "accuracy", rows, markdown(rows, columns), dict(all_ok=ok, rule="err <= 2 * ref_err + 1e-5"))
    return ok


# ------------------------------------------------------------------------------------------------
# grid: one worker process times every shape with one implementation


def grid_shapes(quick: bool):
    import torch

    if quick:
        return [(torch.float16, 64, False, 1024), (torch.float16, 128, True, 4096)]
    return [(dtype, d, causal, N) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128)
            for causal in (False, True) for N in (1024, 4096, 16384)]


def _pin_old_autotuners(d: int) -> None:
    """The previous kernels have no pinning: give each of their autotuners the one pinned configuration."""
    import triton

    from flashcourse.kernels import backward, forward

    def config(kernel):
        bm, bn, warps, stages, *tma = PINNED[(kernel, d)].split(",")
        meta = {"BLOCK_M": int(bm), "BLOCK_N": int(bn)}
        if kernel == "forward":
            meta["USE_TMA"] = bool(tma)
        return triton.Config(meta, num_warps=int(warps), num_stages=int(stages))

    for kernel, tuner in (("forward", forward._attn_fwd_tuned), ("dkdv", backward._dkdv), ("dq", backward._dq)):
        tuner.configs = [config(kernel)]
        tuner.cache.clear()


def worker_grid(args) -> None:
    """Run in a fresh process: time forward and backward of each grid shape, print one JSON line."""
    if args.impl == "old":
        sys.path.insert(0, os.path.abspath(args.old))
    else:
        sys.path.insert(0, ROOT)
    import flashcourse  # noqa: F401  (before triton)
    import torch
    import triton

    from flashcourse.kernels.backward import attention_backward
    from flashcourse.kernels.forward import attention_forward

    assert os.path.dirname(os.path.abspath(flashcourse.__file__)).startswith(
        os.path.abspath(args.old if args.impl == "old" else ROOT)), flashcourse.__file__
    results = []
    for dtype, d, causal, N in grid_shapes(args.quick):
        if args.impl == "old":
            _pin_old_autotuners(d)
        else:
            pin({kernel: PINNED[(kernel, d)] for kernel in ("forward", "dkdv", "dq")})
        B, H = max(1, 16384 // N), 2048 // d
        q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(4))
        scale = d**-0.5
        fwd = lambda: attention_forward(q, k, v, causal=causal, scale=scale)  # noqa: E731
        o, lse = fwd()
        bwd = lambda: attention_backward(q, k, v, o, lse, do, causal=causal, scale=scale)  # noqa: E731
        bwd()
        results.append(dict(dtype=str(dtype).split(".")[1], d=d, causal=causal, N=N, B=B, H=H,
                            fwd_ms=triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median"),
                            bwd_ms=triton.testing.do_bench(bwd, warmup=25, rep=200, return_mode="median")))
        del q, k, v, do, o, lse
        torch.cuda.empty_cache()
    print("RESULT " + json.dumps(results), flush=True)


def part_grid(args) -> None:
    impls = ["new"] + (["old"] if args.old else [])
    runs = {impl: [] for impl in impls}
    for r in range(args.repeats):
        for impl in impls:  # interleaved, so that slow drifts of the device hit both alike
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "grid", "--impl", impl]
            cmd += (["--old", args.old] if args.old else []) + (["--quick"] if args.quick else [])
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCOURSE_CONFIG_")}
            env["PYTHONPATH"] = os.path.abspath(args.old) if impl == "old" else ROOT
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
                raise SystemExit(f"the {impl} worker failed (exit status {proc.returncode})")
            runs[impl].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"run {r + 1}/{args.repeats} {impl}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for i, shape in enumerate(runs["new"][0]):
        row = {key: shape[key] for key in ("dtype", "d", "causal", "N", "B", "H")}
        for impl in impls:
            for mode in ("fwd", "bwd"):
                row[f"{impl}_{mode}_ms"] = statistics.median(run[i][f"{mode}_ms"] for run in runs[impl])
        if args.old:
            for mode in ("fwd", "bwd"):
                row[f"{mode}_new/old"] = row[f"new_{mode}_ms"] / row[f"old_{mode}_ms"]
        rows.append(row)
    columns = list(rows[0])
    extra = dict(pinned=PINNED, repeats=args.repeats, runs=runs)
    if args.old:
        worst = max(max(r["fwd_new/old"], r["bwd_new/old"]) for r in rows)
        extra["worst_new_over_old"] = worst
        print(f"worst new/old time ratio: {worst:.3f} (<= 1.02: not slower)", flush=True)
    write(args.out, "grid", rows, markdown(rows, columns), extra)


# ------------------------------------------------------------------------------------------------
# windows


def part_windows(args) -> None:
    import torch
    import triton

    from flashcourse.kernels.backward import attention_backward
    from flashcourse.kernels.forward import attention_forward

    d, dtype = 128, torch.float16
    pin({kernel: PINNED[(kernel, d)] for kernel in ("forward", "dkdv", "dq")})
    if args.quick:
        cases = [(4096, 256), (4096, 1024)]
    else:
        cases = [(16384, w) for w in (128, 256, 512, 1024, 2048, 4096, 8192)]
        cases += [(N, 1024) for N in (4096, 8192, 32768)]
    rows = []
    for N, w in cases:
        B, H = 1, 2048 // d
        q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(4))
        opts = dict(causal=True, scale=d**-0.5, window_size=(w, 0))
        fwd = lambda: attention_forward(q, k, v, **opts)  # noqa: E731
        o, lse = fwd()
        bwd = lambda: attention_backward(q, k, v, o, lse, do, **opts)  # noqa: E731
        row = dict(N=N, w=w, B=B, H=H, d=d,
                   fwd_ms=triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median"),
                   bwd_ms=triton.testing.do_bench(bwd, warmup=25, rep=200, return_mode="median"))
        # a key window of w + 1 positions per query: the work is ∝ N · (w + 1)
        for mode in ("fwd", "bwd"):
            row[f"{mode}_ns_per_N_w"] = row[f"{mode}_ms"] * 1e6 / (N * (w + 1))
        rows.append(row)
        print(row, flush=True)
        del q, k, v, do, o, lse
        torch.cuda.empty_cache()
    write(args.out, "windows", rows, markdown(rows, list(rows[0])), dict(pinned=PINNED, dtype="float16"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "options-results"), help="directory for the results")
    parser.add_argument("--part", nargs="+", choices=["accuracy", "grid", "windows"],
                        default=["accuracy", "grid", "windows"])
    parser.add_argument("--old", help="a checkout of flashcourse with the previous kernels (grid part)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per implementation (grid part)")
    parser.add_argument("--quick", action="store_true", help="a small subset of each part (smoke test)")
    parser.add_argument("--worker", choices=["grid"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["new", "old"], default="new", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "grid":
        worker_grid(args)
        return 0
    sys.path.insert(0, ROOT)
    import flashcourse  # noqa: F401  (before triton)
    import torch

    ok = True
    if "accuracy" in args.part:
        ok = part_accuracy(args)
    if not torch.cuda.is_available():
        print("no CUDA GPU: the timing parts (grid, windows) are skipped", flush=True)
        return 0 if ok else 1
    if "grid" in args.part:
        part_grid(args)
    if "windows" in args.part:
        part_windows(args)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
