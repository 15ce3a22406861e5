"""Decoding with a KV cache, and variable-length batches, on whatever GPU the machine has (issue 16, item 5).

Part 1, decoding: one new query token per sequence (Nq = 1) over a KV cache of Nk keys, bf16, H = 32
query heads on Hkv = 8 key/value heads of d = 128, for B = 1, 4, 16, 64 and Nk = 1k .. 128k (B · Nk
at most 2M cached tokens). Providers: ``split`` (flash_attn_with_kvcache, num_splits=0: the heuristic
chooses), ``unsplit`` (num_splits=1, one program per (sequence, key/value head)), and PyTorch SDPA
with each backend that runs grouped heads (enable_gqa). Each is first checked against float32
attention on sequence 0, then timed as a decoding engine runs it: 20 calls captured in a CUDA graph
(no Python between calls), the L2 cache flushed before each (a graph of the flushes alone is
subtracted); eager ``do_bench`` times are recorded too. The target: where B · Hkv is below the SM
count and Nk >= 8k, split-KV at least 1.5× faster than the unsplit kernel — printed, row by row.

Part 2, variable length: B sequences of random lengths (uniform in [N/4, N], 16k tokens in all), H = 16,
d = 128, bf16, causal, forward and forward+backward: ``varlen`` (flash_attn_varlen_func on the
packed tokens) against ``padded`` (flash_attn_func on the batch padded to N) and ``sdpa-flash``
(padded); TFLOP/s count the useful work, Σ_b of each sequence's own. Causal attention with the padding
at the end gives the valid rows their exact output in the padded batch too, so all three are checked.

Part 3, the benchmark grid's varlen rows: ``flashcourse`` against ``flashcourse-varlen`` (the same
batch packed, equal lengths) through flashcourse.bench, fwd and bwd.

Files under OUT: decode.json (provenance and every row), decode.csv, decode.md (the tables and the
split-KV check), varlen-grid.json/.csv/.png (part 3). Quick to compile: the decoding kernel has six
candidate configurations (three shapes, pointer or descriptor loads); each part stops starting shapes
after ``--budget`` seconds (150), so the whole run stays under ~8 minutes.

    python3 benchmarks/decode.py OUT            # on a GPU
    python3 benchmarks/decode.py OUT --tiny     # every part at toy sizes (CPU or GPU)
"""

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for a bare checkout

import flashcourse  # noqa: E402  (before triton: on a CPU it switches the interpreter on)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashcourse import bench, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402
from flashcourse.kernels.splitkv import choose_num_splits  # noqa: E402

SIZES = {
    "full": dict(decode=dict(H=32, Hkv=8, d=128, batches=[1, 4, 16, 64], Nks=[2**i for i in range(10, 18)],
                             max_tokens=2**21),
                 varlen=dict(H=16, d=128, seqlens=[1024, 4096], tokens=16384),
                 grid=dict(head_dims=[128], causal=[True], seqlens=[1024, 4096], tokens=16384, hidden=2048,
                           warmup_ms=10, rep_ms=50)),
    "tiny": dict(decode=dict(H=4, Hkv=2, d=32, batches=[1, 2], Nks=[64, 200], max_tokens=400),
                 varlen=dict(H=2, d=32, seqlens=[48], tokens=96),
                 grid=dict(head_dims=[32], causal=[True], seqlens=[64], tokens=128, hidden=64, warmup_ms=0, rep_ms=1,
                           min_runs=1)),
}
SPLIT_TARGET = 1.5  # split-KV over the unsplit kernel where B · Hkv < SMs and Nk >= 8k
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
DTYPE = torch.bfloat16
TOLERANCE = 2e-2  # ‖out − ref‖ / ‖ref‖ in bf16


# ------------------------------------------------------------------------------------------------
# Timing


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds of one ``fn()`` on the GPU with no Python between calls: ``reps`` calls, each after
    an L2 flush, captured in a CUDA graph; minus a graph of the flushes alone. Median of 5 replays."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def capture(body):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as PyTorch asks
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph

    def replay_ms(graph):
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[2]

    def calls():
        for _ in range(reps):
            flush.zero_()
            fn()

    def flushes():
        for _ in range(reps):
            flush.zero_()

    return max(replay_ms(capture(calls)) - replay_ms(capture(flushes)), 0.0) / reps


def eager_ms(fn, timing: dict) -> float:
    return bench.time_ms(fn, warmup_ms=timing.get("warmup_ms", 10), rep_ms=timing.get("rep_ms", 50),
                         min_runs=timing.get("min_runs", 3))


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# Part 1: decoding


def decode_inputs(B, Nk, H, Hkv, d, device):
    """q (B, 1, H, d); the cache (B, Nk, Hkv, d) for flashcourse, and as (B, Hkv, Nk, d) for SDPA."""
    g = torch.Generator(device=device).manual_seed(B * Nk)
    q = torch.randn(B, 1, H, d, generator=g, device=device, dtype=DTYPE)
    k_cache, v_cache = (torch.randn(B, Nk, Hkv, d, generator=g, device=device, dtype=DTYPE) for _ in range(2))
    return q, k_cache, v_cache


def decode_reference(q, k_cache, v_cache):
    """float32 attention of sequence 0, the query heads of a group as rows (no expanded copy): (1, 1, H, d)."""
    H, (Nk, Hkv, d) = q.shape[2], k_cache.shape[1:]
    qg = q[0, 0].float().view(Hkv, H // Hkv, d)
    k, v = k_cache[0].float().transpose(0, 1), v_cache[0].float().transpose(0, 1)  # (Hkv, Nk, d)
    p = torch.softmax(qg @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return (p @ v).reshape(1, 1, H, d)


def decode_providers(q, k_cache, v_cache):
    """name -> (fn returning (B, 1, H, d), note)."""
    kT, vT, qT = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous(), q.transpose(1, 2)
    B, Nk, Hkv, d = k_cache.shape
    splits = choose_num_splits(B * Hkv, Nk, d, q.device)
    providers = {
        "split": (lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=Nk, num_splits=0),
                  f"{splits} splits"),
        "unsplit": (lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=Nk, num_splits=1), ""),
    }
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in SDPA_BACKENDS.items():
            def run(backend=getattr(SDPBackend, backend)):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qT, kT, vT, enable_gqa=True).transpose(1, 2)
            providers[name] = (run, "")
    return providers


def run_decoding(sizes, timing, deadline, device, log):
    c = sizes["decode"]
    rows = []
    for B in c["batches"]:
        for Nk in c["Nks"]:
            if B * Nk > c["max_tokens"]:
                continue
            if time.perf_counter() > deadline:
                rows.append(dict(part="decode", B=B, Nk=Nk, provider="*", status="skipped", note="time budget"))
                continue
            q, k_cache, v_cache = decode_inputs(B, Nk, c["H"], c["Hkv"], c["d"], device)
            want = decode_reference(q, k_cache, v_cache)
            cache_bytes = 2 * k_cache.numel() * k_cache.element_size()
            for name, (fn, note) in decode_providers(q, k_cache, v_cache).items():
                row = dict(part="decode", B=B, Nk=Nk, H=c["H"], Hkv=c["Hkv"], d=c["d"], provider=name, note=note)
                try:
                    err = rel_err(fn()[:1], want)
                    row.update(rel_err=err, status="ok" if err <= TOLERANCE else "failed")
                    if row["status"] == "ok":
                        row["ms"] = row["eager_ms"] = eager_ms(fn, timing)
                        if q.is_cuda:
                            try:
                                row["ms"] = graph_ms(fn)
                            except Exception as exc:  # not capturable: the eager time stands, and says so
                                row["note"] = f"eager time (no CUDA graph: {type(exc).__name__}: {exc})"[:200]
                        row["GB/s"] = cache_bytes / (row["ms"] * 1e-3) / 1e9
                except Exception as exc:  # a backend that cannot run this shape: recorded, the run goes on
                    status, why = bench.classify(exc)
                    row.update(status=status, note=why)
                rows.append(row)
                log(f"decode B={B:<3} Nk={Nk:<7} {name:<15} {row['status']:<8} "
                    f"{bench.fmt_value(row.get('ms'), '.4f', 9)} ms  {row.get('note', '')}")
            del q, k_cache, v_cache
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def split_checks(rows, Hkv, sms):
    """The target, shape by shape: where B · Hkv < SMs and Nk >= 8k, unsplit / split >= 1.5."""
    by = {(r["B"], r["Nk"], r["provider"]): r for r in rows if r.get("part") == "decode"}
    checks = []
    for (B, Nk, name), split in sorted(by.items()):
        if name != "split" or B * Hkv >= sms or Nk < 8192:
            continue
        unsplit = by.get((B, Nk, "unsplit"), {})
        speedup = (unsplit["ms"] / split["ms"]) if split.get("ms") and unsplit.get("ms") else None
        checks.append(dict(B=B, Nk=Nk, splits=split.get("note"), split_ms=split.get("ms"), unsplit_ms=unsplit.get("ms"),
                           speedup=speedup, ok=speedup is not None and speedup >= SPLIT_TARGET))
    return checks


# ------------------------------------------------------------------------------------------------
# Part 2: packed sequences of random lengths


def run_varlen(sizes, timing, deadline, device, log):
    c = sizes["varlen"]
    H, d = c["H"], c["d"]
    rows = []
    for N in c["seqlens"]:
        if time.perf_counter() > deadline:
            rows.append(dict(part="varlen", N=N, provider="*", status="skipped", note="time budget"))
            continue
        g = torch.Generator().manual_seed(N)
        B = max(1, round(c["tokens"] / (0.625 * N)))
        lengths = torch.randint(N // 4, N + 1, (B,), generator=g)
        lengths[0] = N
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(device, torch.int32)
        total = int(lengths.sum())
        packed = [torch.randn(total, H, d, generator=g).to(device, DTYPE) for _ in range(3)]
        # the same tokens padded at the end to (B, N, H, d)
        valid = torch.arange(N)[None, :] < lengths[:, None]
        padded = []
        for t in packed:
            p = torch.zeros(B, N, H, d, dtype=DTYPE, device=device)
            p[valid.to(device)] = t
            padded.append(p)
        # useful work: Σ_b causal attention of L_b tokens
        flops = {mode: sum(bench.attention_flops(1, H, int(n), d, True, mode) for n in lengths)
                 for mode in ("fwd", "fwd+bwd")}

        def varlen(*t):
            return flash_attn_varlen_func(*t, cu, cu, N, N, causal=True)

        def dense(*t):
            return flash_attn_func(*t, causal=True)

        def sdpa(*t):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in t), is_causal=True).transpose(1, 2)

        first = lengths[0].item()  # sequence 0, the longest, against float32 SDPA
        ref = F.scaled_dot_product_attention(*(x[:first].float().transpose(0, 1)[None] for x in packed),
                                             is_causal=True)[0].transpose(0, 1)
        for name, fn, inputs, pick in (("varlen", varlen, packed, lambda o: o[:first]),
                                       ("padded", dense, padded, lambda o: o[0, :first]),
                                       ("sdpa-flash", sdpa, padded, lambda o: o[0, :first])):
            if name == "sdpa-flash" and device != "cuda":
                continue
            for mode in ("fwd", "fwd+bwd"):
                row = dict(part="varlen", N=N, B=B, tokens=total, H=H, d=d, provider=name, mode=mode,
                           note=f"lengths {N // 4}..{N}")
                try:
                    leaves = [t.detach().requires_grad_(mode != "fwd") for t in inputs]
                    err = rel_err(pick(fn(*leaves)).detach(), ref)
                    row.update(rel_err=err, status="ok" if err <= TOLERANCE else "failed")
                    if row["status"] == "ok":
                        if mode == "fwd":
                            def step():
                                with torch.no_grad():
                                    fn(*leaves)
                        else:
                            grad = torch.randn_like(fn(*leaves))

                            def step():
                                torch.autograd.grad(fn(*leaves), leaves, grad)
                        row["ms"] = eager_ms(step, timing)
                        row["TFLOP/s (useful)"] = flops[mode] / (row["ms"] * 1e-3) / 1e12
                except Exception as exc:
                    row.update(zip(("status", "note"), bench.classify(exc)))
                rows.append(row)
                log(f"varlen N={N:<6} B={B:<3} {name:<11} {mode:<8} {row['status']:<8} "
                    f"{bench.fmt_value(row.get('ms'), '.3f', 9)} ms")
    return rows


# ------------------------------------------------------------------------------------------------
# Files


def table(rows, columns) -> str:
    f = bench.fmt_value
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f(r.get(c), ".4g") if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in columns) + " |")
    return "\n".join(lines)


def write(out: Path, prov, rows, checks, extra):
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(dict(provenance=prov, rows=rows, split_checks=checks, **extra),
                                                indent=1, default=str))
    columns = sorted({c for r in rows for c in r})
    with open(out / "decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    decode = [r for r in rows if r.get("part") == "decode"]
    varlen = [r for r in rows if r.get("part") == "varlen"]
    text = [f"# Decoding and variable-length batches on {prov['device']}",
            f"torch {prov['torch']}, triton {prov['triton']}, CUDA {prov.get('cuda')}, driver {prov.get('driver')}, "
            f"commit {prov.get('git_commit') or extra.get('commit')}, {prov['date']}; `{prov['command']}`",
            "## Decoding (Nq = 1): ms per call in a CUDA graph (L2 flushed), eager ms, cache GB/s",
            table(decode, ["B", "Nk", "provider", "status", "ms", "eager_ms", "GB/s", "rel_err", "note"]),
            f"## Split-KV against the unsplit kernel where B · Hkv < {extra.get('sms')} SMs and Nk >= 8k "
            f"(target >= {SPLIT_TARGET}×)",
            table(checks, ["B", "Nk", "splits", "split_ms", "unsplit_ms", "speedup", "ok"]),
            "## Packed sequences of random lengths (causal, 16k tokens): useful TFLOP/s",
            table(varlen, ["N", "B", "tokens", "provider", "mode", "status", "ms", "TFLOP/s (useful)", "rel_err",
                           "note"])]
    (out / "decode.md").write_text("\n\n".join(text) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory for the files (on the device: $OUT)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every part quickly, CPU or GPU")
    p.add_argument("--budget", type=float, default=150, help="seconds per part; shapes not started by then are "
                                                             "skipped [150]")
    p.add_argument("--commit", help="git commit of the code, recorded when the checkout has no .git")
    a = p.parse_args(argv)
    sizes = SIZES["tiny" if a.tiny else "full"]
    timing = dict(warmup_ms=0, rep_ms=1, min_runs=1) if a.tiny else dict(warmup_ms=10, rep_ms=50)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = "python3 benchmarks/decode.py OUT" + (" --tiny" if a.tiny else "")
    prov = bench.provenance(command)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    out = Path(a.out)
    extra = dict(commit=a.commit, sms=sms, plan="tiny" if a.tiny else "full")
    t0 = time.perf_counter()

    def log(line):
        print(f"[{time.perf_counter() - t0:5.0f} s] {line}", flush=True)

    rows = run_decoding(sizes, timing, t0 + a.budget, device, log)
    checks = split_checks(rows, sizes["decode"]["Hkv"], sms)
    write(out, prov, rows, checks, extra)
    rows += run_varlen(sizes, timing, time.perf_counter() + a.budget, device, log)
    write(out, prov, rows, checks, extra)
    log("part 3: the grid's varlen rows")
    grid = bench.benchmark(providers=["flashcourse", "flashcourse-varlen"], modes=["fwd", "bwd"], dtypes=["bfloat16"],
                           **sizes["grid"], time_budget_s=a.budget, progress=False)
    bench.save(grid, out, "varlen-grid", command=command, extra=extra)
    print(bench.format_results(grid))

    print("\nsplit-KV target: unsplit / split >= %.1f where B·Hkv < %d SMs and Nk >= 8k" % (SPLIT_TARGET, sms))
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  B={c['B']:<3} Nk={c['Nk']:<7} {c['splits']:<10} "
              f"split {bench.fmt_value(c['split_ms'], '.4f')} ms, "
              f"unsplit {bench.fmt_value(c['unsplit_ms'], '.4f')} ms, "
              f"speedup {bench.fmt_value(c['speedup'], '.2f')}")
    failed = [r for r in rows + [m.__dict__ for m in grid] if r.get("status") in ("failed", "error")]
    print(f"\n{len(failed)} measurement(s) failed their check or raised; files under {out} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if failed or not all(c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
