"""Ring attention and Ulysses on the GPUs of one host (NCCL): correctness, scaling, overlap, memory.

Shape of issue 17: B = 1, H = 16, d = 128, causal, bfloat16, N in {32k, 128k, 512k}, P = 2 GPUs.

1. correctness at the smallest N: ring (zigzag, contiguous) and Ulysses, forward and backward,
   gathered on rank 0 and compared with single-GPU ``flash_attention`` over the whole sequence, with
   flash-attn's rule: error against a float32 reference (PyTorch SDPA) at most twice that of the
   single-GPU kernel in bfloat16, plus a small atol.
2. for each N: T₁, single-GPU ``flash_attention`` (fwd and fwd+bwd; where one GPU cannot hold N,
   estimated from the largest measured N scaled by N² and marked so); T_P for each strategy, with and
   without communication (``communicate=False``: the same kernel work, no transfers); the transfers
   alone (one K/V hop, and the dK/dV hop of the backward); peak memory per GPU
   (``torch.cuda.max_memory_allocated``). Scaling efficiency = T₁ / (P · T_P); the share of the
   transfer time that overlap hides = 1 − (T_P − T_P without communication) / (transfer time alone).
3. OUT_DIR/ring.json (provenance and every number) and OUT_DIR/ring.md (the tables).

A size whose predicted time (the previous size's, times the growth of N² and of the runs per
measurement) would pass ``--budget-s``
is skipped with a note, so the run ends in time (about 5–7 minutes on 2 H100s, compilation included).

    python3 benchmarks/ring.py OUT_DIR                       # the recorded run, 2 GPUs
    python3 benchmarks/ring.py OUT_DIR --sizes 4096 --reps 1 # a quick smoke run
"""

import os

# NVLink multicast (NVLS) off before anything can create an NCCL communicator
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a bare checkout

import flashcourse  # noqa: E402,F401  (before triton)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from flashcourse import distributed as D  # noqa: E402
from flashcourse.bench import provenance  # noqa: E402

SIZES = [32768, 131072, 524288]
STRATEGIES = ["ring-zigzag", "ring-contiguous", "ulysses"]
ATOL = 1e-3  # beside twice the single-GPU bfloat16 error


def attend(strategy, q, k, v, communicate=True):
    if strategy == "ulysses":
        return D.ulysses_attention(q, k, v, causal=True, communicate=communicate)
    return D.ring_attention(q, k, v, causal=True, layout=strategy.split("-")[1], communicate=communicate)


def layout_of(strategy):
    return "zigzag" if strategy == "ring-zigzag" else "contiguous"


DEVICE = "cuda"  # "cpu" with --cpu: gloo and interpreted kernels, a smoke test of this script


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def max_over_ranks(values):
    t = torch.tensor([float("nan") if x is None else x for x in values], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def timed(step, reps):
    """Median (first part ms, whole ms) over ``reps`` runs of ``step(mark)`` on this rank, where step calls
    mark() once between its two parts; the ranks start each run together."""
    times = []
    for _ in range(reps):
        dist.barrier()
        sync()
        start = time.perf_counter()
        marks = []

        def mark():
            sync()
            marks.append(time.perf_counter())

        step(mark)
        sync()
        times.append((1e3 * (marks[0] - start), 1e3 * (time.perf_counter() - start)))
    times.sort(key=lambda t: t[1])
    return list(times[len(times) // 2])


def fwd_bwd(fn, inputs, dO):
    """step(mark): forward fn(*inputs), mark(), backward with dO."""
    def step(mark):
        for t in inputs:
            t.grad = None
        o = fn(*inputs)
        mark()
        o.backward(dO)
    return step


def shapes(cfg, N):
    B, H, Hkv, d = cfg["B"], cfg["H"], cfg["Hkv"], cfg["d"]
    return (B, H, N, d), (B, Hkv, N, d)


def randn(shape, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16)


def correctness(rank, P, cfg, N):
    """Rank 0: every strategy's O, dQ, dK, dV (gathered) against single-GPU flash_attention in bfloat16,
    both measured against a float32 reference."""
    qs, ks = shapes(cfg, N)
    q, k, v, dO = randn(qs, 1), randn(ks, 2), randn(ks, 3), randn(qs, 4)
    for t in (q, k, v, dO):
        dist.broadcast(t, src=0)  # every rank shards the same sequence
    rows = []
    got = {}
    for strategy in STRATEGIES:
        layout = layout_of(strategy)
        shards = [D.shard(t, rank, P, layout).requires_grad_(i < 3) for i, t in enumerate((q, k, v, dO))]
        o = attend(strategy, *shards[:3])
        o.backward(shards[3])
        local = [o.detach(), *(t.grad for t in shards[:3])]
        gathered = []
        for t in local:
            parts = [torch.empty_like(t) for _ in range(P)]
            dist.all_gather(parts, t.contiguous())
            gathered.append(D.unshard(parts, layout).cpu() if rank == 0 else None)
        got[strategy] = gathered
        del shards, o, local
    if rank == 0:
        def reference(dtype):
            x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            if dtype == torch.bfloat16:
                o = flashcourse.flash_attention(*x, causal=True)
            else:  # memory-efficient SDPA runs float32 in O(N) memory on a GPU
                backends = [SDPBackend.EFFICIENT_ATTENTION] if DEVICE == "cuda" else [SDPBackend.MATH]
                with sdpa_kernel(backends):
                    o = F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=cfg["Hkv"] != cfg["H"])
            o.backward(dO.to(dtype))
            return [t.detach().float().cpu() for t in (o, *(y.grad for y in x))]

        exact, single = reference(torch.float32), reference(torch.bfloat16)
        for strategy in STRATEGIES:
            for name, mine, base, ref in zip(("O", "dQ", "dK", "dV"), got[strategy], single, exact):
                err, base_err = (mine.float() - ref).abs().max().item(), (base - ref).abs().max().item()
                rows.append(dict(strategy=strategy, tensor=name, err=err, single_gpu_err=base_err,
                                 diff_to_single_gpu=(mine.float() - base).abs().max().item(),
                                 ok=bool(err <= 2 * base_err + ATOL)))
    reset_peak()
    return rows


def single_gpu(cfg, N, reps):
    """T₁: flash_attention fwd and fwd+bwd on one GPU, with its peak memory."""
    qs, ks = shapes(cfg, N)
    reset_peak()
    x = [randn(qs, 1).requires_grad_(), randn(ks, 2).requires_grad_(), randn(ks, 3).requires_grad_()]
    ms = timed(fwd_bwd(lambda q, k, v: flashcourse.flash_attention(q, k, v, causal=True), x, randn(qs, 4)), reps)
    peak = peak_gib()
    del x
    return ms, peak


def distributed(rank, P, cfg, N, strategy, communicate, reps):
    """T_P of one strategy on this rank's shards, and this rank's peak memory."""
    qs, ks = shapes(cfg, N // P)
    reset_peak()
    x = [randn(qs, 10 + rank).requires_grad_(), randn(ks, 20 + rank).requires_grad_(),
         randn(ks, 30 + rank).requires_grad_()]
    ms = timed(fwd_bwd(lambda q, k, v: attend(strategy, q, k, v, communicate), x, randn(qs, 40 + rank)), reps)
    peak = peak_gib()
    del x
    return ms, peak


def transfers_alone(cfg, N, P, reps):
    """ms of one ring hop of the K/V shards (bf16) and of the dK/dV accumulators (float32), no compute."""
    _, ks = shapes(cfg, N // P)
    kv = [randn(ks, 5), randn(ks, 6)]
    grads = [t.float() for t in kv]
    out = []
    for tensors in (kv, grads):
        def step(mark, tensors=tensors):
            D.ring_send_recv(tensors).wait()
            mark()
        out.append(timed(step, reps)[0])
    return out


def fits(bytes_needed):
    if DEVICE == "cpu":
        return True
    free, _ = torch.cuda.mem_get_info()
    return bytes_needed < 0.85 * free


def bench_rank(rank, P, cfg):
    global DEVICE
    DEVICE = cfg["device"]
    start = time.perf_counter()
    B, H, Hkv, d = cfg["B"], cfg["H"], cfg["Hkv"], cfg["d"]

    def log(*a):
        if rank == 0:
            print(f"[{time.perf_counter() - start:6.1f} s]", *a, flush=True)

    dist.barrier()
    result = dict(config={k: v for k, v in cfg.items() if k not in ("out_dir", "provenance")}, sizes=[], notes=[])
    if DEVICE == "cuda":
        result.update(devices=[torch.cuda.get_device_name(i) for i in range(P)],
                      nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        result.update(devices=["CPU (gloo, Triton interpreter)"] * P, nccl=None)
    log(f"{P} ranks up; correctness at N = {cfg['sizes'][0]}")
    result["correctness"] = correctness(rank, P, cfg, cfg["sizes"][0])
    if rank == 0:
        write(cfg["out_dir"], cfg["provenance"], result)
    for row in result["correctness"]:
        log(f"  {row['strategy']:16s} {row['tensor']:3s} err {row['err']:.2e}  single-GPU {row['single_gpu_err']:.2e}"
            f"  {'ok' if row['ok'] else 'FAIL'}")
    previous = None  # (N, seconds, runs per measurement) of the last size measured
    for N in cfg["sizes"]:
        elapsed = max_over_ranks([time.perf_counter() - start])[0]
        reps = cfg["reps"] if N <= 131072 else max(1, cfg["reps"] // 2)
        # warm-ups at the first size only: every N >= 32k shares the kernels' autotuning key
        warm = N == cfg["sizes"][0] or N < 32768
        runs = reps + warm
        if previous is not None:
            predicted = previous[1] * (N / previous[0]) ** 2 * runs / previous[2]
            if elapsed + predicted > cfg["budget_s"]:
                note = f"N = {N} skipped: predicted {predicted:.0f} s would pass the {cfg['budget_s']:.0f} s budget"
                log(note)
                result["notes"].append(note)
                continue
        size_start = time.perf_counter()
        row = dict(N=N, P=P, B=B, H=H, Hkv=Hkv, d=d, reps=reps)
        # T₁: every rank runs it on its own GPU at once (no communication); rank 0's numbers are reported
        single_bytes = (8 * 2 + 8) * B * H * N * d
        fit1 = max_over_ranks([0.0 if fits(single_bytes) else 1.0])[0] == 0.0
        if fit1:
            if warm:
                single_gpu(cfg, N, 1)
            (t1, t1_total), peak1 = single_gpu(cfg, N, reps)
            row.update(T1_fwd_ms=t1, T1_ms=t1_total, T1_estimated=False, T1_peak_gib=peak1)
        else:
            base = max((r for r in result["sizes"] if not r["T1_estimated"]), key=lambda r: r["N"], default=None)
            if base is None:
                row.update(T1_fwd_ms=None, T1_ms=None, T1_estimated=True, T1_peak_gib=None)
            else:
                f = (N / base["N"]) ** 2
                row.update(T1_fwd_ms=base["T1_fwd_ms"] * f, T1_ms=base["T1_ms"] * f, T1_estimated=True,
                           T1_peak_gib=None)
                result["notes"].append(f"N = {N}: T1 estimated from N = {base['N']} times (N ratio)^2 = {f:.0f}: "
                                       f"one GPU cannot hold it")
        log(f"N = {N}: T1 fwd {fmt(row['T1_fwd_ms'])} ms, fwd+bwd {fmt(row['T1_ms'])} ms"
            + (" (estimated)" if row["T1_estimated"] else ""))
        row["strategies"] = {}
        shard_bytes = 48 * B * H * (N // P) * d
        if not max_over_ranks([0.0 if fits(shard_bytes) else 1.0])[0] == 0.0:
            note = f"N = {N}: the shards do not fit in GPU memory; strategies skipped"
            result["notes"].append(note)
            log(note)
        else:
            for strategy in STRATEGIES:
                s = {}
                for communicate in (True, False):
                    if warm:
                        distributed(rank, P, cfg, N, strategy, communicate, 1)
                    ms, peak = distributed(rank, P, cfg, N, strategy, communicate, reps)
                    ms, peak = max_over_ranks(ms), max_over_ranks([peak])[0]
                    key = "" if communicate else "_nocomm"
                    s.update({f"fwd_ms{key}": ms[0], f"ms{key}": ms[1], f"peak_gib{key}": peak})
                if row["T1_ms"] is not None:
                    s["efficiency_fwd"] = row["T1_fwd_ms"] / (P * s["fwd_ms"])
                    s["efficiency"] = row["T1_ms"] / (P * s["ms"])
                row["strategies"][strategy] = s
                log(f"  {strategy:16s} fwd {s['fwd_ms']:9.2f} ms (no comm {s['fwd_ms_nocomm']:9.2f})  fwd+bwd "
                    f"{s['ms']:9.2f} ms (no comm {s['ms_nocomm']:9.2f})  peak {s['peak_gib']:.2f} GiB  "
                    f"efficiency {s.get('efficiency', float('nan')):.2f}")
            kv_ms, grad_ms = max_over_ranks(transfers_alone(cfg, N, P, reps))
            row.update(kv_hop_ms=kv_ms, grad_hop_ms=grad_ms,
                       kv_hop_gb_per_s=2 * B * Hkv * (N // P) * d * 2 / kv_ms / 1e6)
            for strategy, s in row["strategies"].items():
                if strategy.startswith("ring"):
                    # forward: P − 1 K/V hops; backward: P − 1 K/V hops and P dK/dV hops
                    alone_fwd = (P - 1) * kv_ms
                    alone = 2 * (P - 1) * kv_ms + P * grad_ms
                    s["comm_alone_fwd_ms"], s["comm_alone_ms"] = alone_fwd, alone
                    s["hidden_fwd"] = 1 - max(s["fwd_ms"] - s["fwd_ms_nocomm"], 0) / alone_fwd
                    s["hidden"] = 1 - max(s["ms"] - s["ms_nocomm"], 0) / alone
            log(f"  one K/V hop {kv_ms:.2f} ms ({row['kv_hop_gb_per_s']:.0f} GB/s), one dK/dV hop {grad_ms:.2f} ms")
        result["sizes"].append(row)
        if rank == 0:  # after every size: a run cut short keeps what it measured
            write(cfg["out_dir"], cfg["provenance"], result)
        previous = (N, max_over_ranks([time.perf_counter() - size_start])[0], runs)
    return result if rank == 0 else None


def write(out_dir, info, result):
    """OUT_DIR/ring.json (provenance and every number) and OUT_DIR/ring.md (the tables)."""
    out_dir = Path(out_dir)
    (out_dir / "ring.json").write_text(json.dumps(dict(provenance=info, **result), indent=1))
    (out_dir / "ring.md").write_text(markdown(info, result))


def fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def markdown(info, result):
    lines = [f"# Ring attention and Ulysses on {len(result['devices'])} × {result['devices'][0]}", ""]
    cfg = result["config"]
    lines += [f"- devices: {', '.join(result['devices'])}; torch {info['torch']}, triton {info['triton']}, "
              f"NCCL {result['nccl']}, CUDA {info.get('cuda')}", f"- date {info['date']}, git commit {info['git_commit']}",
              f"- command: `{info['command']}`",
              f"- shape: B = {cfg['B']}, H = {cfg['H']}, d = {cfg['d']}, causal, bfloat16; NCCL_NVLS_ENABLE=0", ""]
    lines += ["## Correctness at the smallest N (against a float32 reference; pass: error ≤ 2 × single-GPU + 1e-3)", "",
              "| strategy | tensor | max error | single-GPU bf16 error | max diff to single GPU | pass |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['tensor']} | {r['err']:.2e} | {r['single_gpu_err']:.2e} | "
              f"{r['diff_to_single_gpu']:.2e} | {'yes' if r['ok'] else 'NO'} |" for r in result["correctness"]]
    lines += ["", "## Time (ms, slowest rank, median), scaling efficiency T₁ / (P · T_P), overlap, memory", "",
              "| N | strategy | T₁ fwd | T_P fwd | eff. fwd | T₁ fwd+bwd | T_P fwd+bwd | eff. | T_P no comm | "
              "comm alone | hidden | peak GiB/GPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        est = " (est.)" if row["T1_estimated"] else ""
        for strategy, s in row["strategies"].items():
            lines.append(
                f"| {row['N']} | {strategy} | {fmt(row['T1_fwd_ms'])}{est} | {s['fwd_ms']:.1f} | "
                f"{fmt(s.get('efficiency_fwd'), '.2f')} | {fmt(row['T1_ms'])}{est} | {s['ms']:.1f} | "
                f"{fmt(s.get('efficiency'), '.2f')} | {s['ms_nocomm']:.1f} | {fmt(s.get('comm_alone_ms'))} | "
                f"{fmt(None if 'hidden' not in s else 100 * s['hidden'], '.0f')}{'%' if 'hidden' in s else ''} | "
                f"{s['peak_gib']:.2f} |")
        if "kv_hop_ms" in row:
            lines.append(f"| {row['N']} | one K/V hop | | {row['kv_hop_ms']:.2f} ({row['kv_hop_gb_per_s']:.0f} GB/s) "
                         f"| | | | | | one dK/dV hop {row['grad_hop_ms']:.2f} | | |")
    peaks = ", ".join(f"{r['T1_peak_gib']:.2f} GiB at N = {r['N']}" for r in result["sizes"] if r["T1_peak_gib"])
    lines += ["", "T₁: single-GPU flash_attention" + (f" (peak {peaks})" if peaks else "") + ". no comm: the same kernels with `communicate=False`. hidden: 1 − (T_P − T_P no comm) / comm alone "
              "(ring only; Ulysses' all-to-alls cannot overlap its attention)."]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement (halved above 128k)")
    parser.add_argument("--budget-s", type=float, default=380.0, help="skip sizes predicted to end later than this")
    parser.add_argument("--cpu", action="store_true",
                        help="smoke test: gloo, interpreted kernels, H = 2, d = 16, N = 64 unless --sizes")
    args = parser.parse_args(argv)
    P = args.gpus
    if args.cpu:
        cfg = dict(device="cpu", B=1, H=2, Hkv=2, d=16, sizes=[64] if args.sizes == SIZES else args.sizes)
    else:
        if torch.cuda.device_count() < P:
            sys.exit(f"ring.py needs {P} GPUs of one host, found {torch.cuda.device_count()}")
        cfg = dict(device="cuda", B=1, H=16, Hkv=16, d=128, sizes=args.sizes)
    if any(n % (2 * P) for n in cfg["sizes"]):
        sys.exit(f"every N must be divisible by 2P = {2 * P} (the zigzag layout)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # the command as run, without this machine's output path
    argv = ["OUT_DIR" if a == str(args.out_dir) else a for a in (argv if argv is not None else sys.argv[1:])]
    info = provenance(shlex.join(["python3", "benchmarks/ring.py", *argv]))
    cfg.update(sizes=sorted(cfg["sizes"]), reps=args.reps, budget_s=args.budget_s, out_dir=str(args.out_dir),
               provenance=info)
    # the ranks stop (TimeoutError) well before a 10-minute limit on the command
    result = D.launch(bench_rank, P, cfg, backend="gloo" if args.cpu else "nccl", timeout=args.budget_s + 150)[0]
    write(args.out_dir, info, result)
    print((args.out_dir / "ring.md").read_text())
    ok = all(r["ok"] for r in result["correctness"])
    print("correctness:", "all pass" if ok else "SOME FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
