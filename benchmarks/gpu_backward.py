"""Time the Triton backward against PyTorch SDPA's backward on a GPU, in one process.

    python benchmarks/gpu_backward.py [--quick] [--out DIR]

Shapes as in the FlashAttention papers: B · N = 16k tokens, H · d = 2048; fp16 and bf16, d 64 and 128,
causal and not, N in 1024, 4096, 16384. Only the backward is timed: the forward output is computed
once, and each provider's gradient call runs on it (``retain_graph`` for SDPA). Backward FLOPs are
2.5 × 4 · B · H · N² · d, halved when causal. Before timing, our gradients are checked against
SDPA's (flash backend). Prints a table and writes ``gpu_backward.json`` with provenance.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
from concurrent.futures import ProcessPoolExecutor

import flashcourse  # noqa: F401  (before triton)
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashcourse.kernels import backward as bw

BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def _tflops(B, H, N, d, causal, ms):
    flops = 2.5 * 4 * B * H * N * N * d / (2 if causal else 1)
    return flops / ms * 1e-9


def _forward_with_lse(q, k, v, causal, scale):
    """O and the natural-log logsumexp L (B, H, N) float32, from SDPA's flash forward."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def bench_one(dtype, d, causal, N, tokens=16384, width=2048):
    B, H = max(1, tokens // N), width // d
    scale = d**-0.5
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
    row = dict(dtype=str(dtype).split(".")[-1], d=d, causal=causal, N=N, B=B, H=H)

    o, lse = _forward_with_lse(q.detach(), k.detach(), v.detach(), causal, scale)
    ours = lambda: bw.attention_backward(q.detach(), k.detach(), v.detach(), o, lse, do, causal=causal, scale=scale)  # noqa: E731
    mine = ours()  # autotunes on the first call for this shape
    for name, kernel in (("dkdv", bw._dkdv), ("dq", bw._dq)):
        timings = getattr(kernel, "configs_timings", None) or {}
        row[f"{name}_config_times"] = {str(c): t[0] if isinstance(t, list) else t for c, t in timings.items()}
    row["flashcourse_ms"] = triton.testing.do_bench(ours, warmup=25, rep=200, return_mode="median")
    row["dkdv_config"] = str(bw._dkdv.best_config)
    row["dq_config"] = str(bw._dq.best_config)
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
                grad = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
                theirs = grad()
                row[f"{name}_ms"] = triton.testing.do_bench(grad, warmup=25, rep=200, return_mode="median")
            if name == "sdpa-flash":
                row["max_rel_err_vs_flash"] = max(
                    ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(mine, theirs))
        except RuntimeError as e:  # a backend that does not take this shape
            row[f"{name}_ms"] = None
            print(f"  {name}: {str(e).splitlines()[0][:100]}")
    for key in [k for k in row if k.endswith("_ms") and row[k]]:
        row[key.replace("_ms", "_tflops")] = _tflops(B, H, N, d, causal, row[key])
    return row


def _warm(combo):
    """Compile every candidate configuration of one (dtype, d, causal) into Triton's disk cache."""
    dtype, d, causal = combo
    q, k, v, do = (torch.randn(1, 16, 256, d, device="cuda", dtype=dtype) for _ in range(4))
    o, lse = _forward_with_lse(q, k, v, causal, d**-0.5)
    bw.attention_backward(q, k, v, o, lse, do, causal=causal, scale=d**-0.5)
    torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only fp16, N = 4096")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--warm-only", action="store_true",
                        help="compile all kernels in parallel processes (one per dtype, d, causal) and stop")
    args = parser.parse_args()
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    combos = [(dtype, d, causal) for dtype in dtypes for d in (64, 128) for causal in (False, True)]
    if args.warm_only:  # the same integer specialisations as the timed shapes (H, N multiples of 16)
        with ProcessPoolExecutor(len(combos), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_warm, combos))
        return
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(info, flush=True)
    rows = []
    for dtype, d, causal in combos:
        for N in [4096] if args.quick else [1024, 4096, 16384]:
            rows.append(bench_one(dtype, d, causal, N))
            r = rows[-1]
            print(f"{r['dtype']} d={d} causal={causal:d} N={N:5d}  ours {r['flashcourse_tflops']:6.1f}"
                  f"  flash {r.get('sdpa-flash_tflops') or 0:6.1f}  cudnn {r.get('sdpa-cudnn_tflops') or 0:6.1f}"
                  f"  eff {r.get('sdpa-efficient_tflops') or 0:6.1f}  err {r.get('max_rel_err_vs_flash', -1):.1e}"
                  f"  {r['dkdv_config']} | {r['dq_config']}", flush=True)
            with open(os.path.join(args.out, "gpu_backward.json"), "w") as f:
                json.dump(dict(info=info, rows=rows), f, indent=1)
    print("\nTFLOP/s (backward only) and ratios ours / SDPA backend")
    print("dtype     d causal     N   ours  flash  cudnn    eff  /flash /cudnn   /eff")
    for r in rows:
        t = [r.get(f"{p}_tflops") or float("nan") for p in ("flashcourse", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")]
        print(f"{r['dtype']:8s} {r['d']:3d} {r['causal']!s:6s} {r['N']:5d} " + " ".join(f"{x:6.1f}" for x in t)
              + " " + " ".join(f"{t[0] / x:6.2f}" for x in t[1:]))


if __name__ == "__main__":
    main()
