"""Time the Triton forward against PyTorch SDPA's forward backends on a GPU, in one process.

    PYTHONPATH=. python benchmarks/gpu_forward.py [--quick] [--pointers] [--out DIR]

Shapes as in the FlashAttention papers: B · N = 16k tokens, H · d = 2048; fp16 and bf16, d 64 and
128, causal and not, N in 1024, 4096, 16384. Forward FLOPs are 4 · B · H · N² · d, halved when
causal. Before timing, our output is checked against SDPA's. The autotuner's timing of every
candidate configuration is kept, so one run also says which block shapes win where; ``--pointers``
also times fp16 with K_j, V_j loaded through masked pointers instead of tensor descriptors. Prints a
table of TFLOP/s and ratios and writes ``gpu_forward.json`` with provenance.
"""

import argparse
import datetime
import json
import os
import platform

import flashcourse  # noqa: F401  (before triton)
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashcourse.kernels import configs
from flashcourse.kernels.forward import _attn_fwd_tuned, attention_forward

BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def tflops(B, H, N, d, causal, ms):
    return 4 * B * H * N * N * d / (2 if causal else 1) / ms * 1e-9


def time_ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench_one(dtype, d, causal, N, pointers=False, tokens=16384, width=2048):
    B, H = max(1, tokens // N), width // d
    scale = d**-0.5
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(3))
    row = dict(dtype=str(dtype).split(".")[-1], d=d, causal=causal, N=N, B=B, H=H)

    ours = lambda: attention_forward(q, k, v, causal=causal, scale=scale)  # noqa: E731
    o = ours()[0]
    row["config"] = str(_attn_fwd_tuned.best_config)
    row["config_timings_ms"] = {str(c): t[0] if isinstance(t, list) else t
                                for c, t in getattr(_attn_fwd_tuned, "configs_timings", {}).items()}
    row["flashcourse_ms"] = time_ms(ours)
    if pointers:
        configs.USE_TENSOR_DESCRIPTORS = False
        try:
            row["pointers_rel_err"] = ((ours()[0].float() - o.float()).norm() / o.float().norm()).item()
            row["pointers_config"] = str(_attn_fwd_tuned.best_config)
            row["pointers_tflops"] = tflops(B, H, N, d, causal, time_ms(ours))
        finally:
            configs.USE_TENSOR_DESCRIPTORS = True
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # noqa: E731
                theirs = run()
                row[f"{name}_ms"] = time_ms(run)
            if name == "sdpa-flash":
                row["rel_err_vs_sdpa_flash"] = ((o.float() - theirs.float()).norm() / theirs.float().norm()).item()
        except RuntimeError as e:  # a backend that does not support this shape or dtype
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = str(e).splitlines()[0][:200]
    for name in ["flashcourse", *BACKENDS]:
        ms = row[f"{name}_ms"]
        row[f"{name}_tflops"] = None if ms is None else tflops(B, H, N, d, causal, ms)
    del q, k, v, o
    torch.cuda.empty_cache()
    return row


def ratio(row, name):
    theirs = row[f"{name}_tflops"]
    return float("nan") if not theirs else row["flashcourse_tflops"] / theirs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp16, d=128, N=4096 only")
    parser.add_argument("--pointers", action="store_true", help="also time fp16 with pointer loads")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    dims = [128] if args.quick else [64, 128]
    lengths = [4096] if args.quick else [1024, 4096, 16384]
    rows = []
    for dtype in dtypes:
        for d in dims:
            for causal in (False, True):
                for N in lengths:
                    row = bench_one(dtype, d, causal, N, pointers=args.pointers and dtype == torch.float16)
                    rows.append(row)
                    print(f"{row['dtype']} d={d} causal={causal} N={N}: {row['flashcourse_tflops']:.0f} TFLOP/s "
                          f"({row['config']}); pointers {row.get('pointers_tflops', 0):.0f} "
                          f"({row.get('pointers_config')}); timings {row['config_timings_ms']}", flush=True)
    provenance = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
    )
    with open(os.path.join(args.out, "gpu_forward.json"), "w") as f:
        json.dump(dict(provenance=provenance, rows=rows), f, indent=1)
    print(provenance)
    print("| dtype | d | causal | N | ours | sdpa-flash | sdpa-cudnn | sdpa-efficient | ×flash | ×cudnn | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = [r[f"{n}_tflops"] for n in ["flashcourse", *BACKENDS]]
        cells = " | ".join("—" if x is None else f"{x:.0f}" for x in t)
        print(f"| {r['dtype']} | {r['d']} | {r['causal']} | {r['N']} | {cells} | {ratio(r, 'sdpa-flash'):.2f} | "
              f"{ratio(r, 'sdpa-cudnn'):.2f} | {r.get('rel_err_vs_sdpa_flash', float('nan')):.1e} |")


if __name__ == "__main__":
    main()
