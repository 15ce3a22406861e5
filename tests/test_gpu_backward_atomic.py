"""The one-kernel backward that adds dQ with atomics (``deterministic=False``) on a CUDA GPU at real sizes.

The deterministic backward's GPU cases (test_gpu_backward.py: tolerances against float64 autograd and
SDPA's own error) and flash-attn's accuracy rule for every score option (test_flash_options.py), run
again through the atomic kernel: autotuned (the autotuner zeroes dQ between its trial runs: a first
call that tunes must still be right), and pinned with dQ added through tensor descriptors (Hopper's
TMA reductions, ``,tma``: a GPU-only path that the CPU interpreter cannot run).
"""

import functools

import pytest
import torch

import test_flash_options
import test_gpu_backward
from flashcourse import flash_attention, naive_attention
from flashcourse.kernels.backward import attention_backward
from flashcourse.kernels.configs import KernelConfig
from helpers import make_qkv, rel_err

pytestmark = pytest.mark.gpu

# the one-kernel backward with dQ added by the copy engine, per head dim (benchmarks/perf_experiments.py)
DESCRIPTOR_CONFIGS = {64: KernelConfig(32, 128, 4, 4, True), 128: KernelConfig(64, 128, 8, 3, True)}


@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,d,causal,dtype", test_gpu_backward.CASES)
def test_atomic_gradients_at_real_sizes(B, H, Hkv, Nq, Nk, d, causal, dtype, monkeypatch):
    monkeypatch.setattr(test_gpu_backward, "attention_backward",
                        functools.partial(attention_backward, deterministic=False))
    test_gpu_backward.test_gradients_at_real_sizes(B, H, Hkv, Nq, Nk, d, causal, dtype)


@pytest.mark.parametrize("case", ["N1000-d128-causal-gqa-fp16", "Nq<Nk-causal-bf16", "N4096-d64-fp16",
                                  "N1024-d64-causal-bf16"])
def test_descriptor_additions_at_real_sizes(case, monkeypatch):
    [params] = [c.values for c in test_gpu_backward.CASES if c.id == case]
    d = params[5]
    monkeypatch.setattr(test_gpu_backward, "attention_backward",
                        functools.partial(attention_backward, deterministic=False,
                                          dkdvdq_config=DESCRIPTOR_CONFIGS[d]))
    test_gpu_backward.test_gradients_at_real_sizes(*params)


@pytest.mark.parametrize("option", ["window-both", "softcap", "alibi-BH", "dropout"])
def test_atomic_backward_with_options_on_gpu(option, monkeypatch):
    monkeypatch.setattr(test_flash_options, "flash_attention", functools.partial(flash_attention,
                                                                                deterministic=False))
    options = dict(test_flash_options.OPTIONS[option])
    if "window_size" in options:
        options["window_size"] = tuple(25 * w if w > 0 else w for w in options["window_size"])
    test_flash_options.check_accuracy("cuda", torch.bfloat16, 2, 8, 2, 1000, 1200, 128, seed=7, causal=True,
                                      **options)


def test_atomic_dk_dv_match_and_dq_varies_only_in_rounding():
    """dK and dV as the deterministic kernels give them; dq from two runs within float32 summation noise."""
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, 128, dtype=torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    o, lse = naive_attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.1)
    first = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.1, deterministic=False)
    second = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.1, deterministic=False)
    for name, a, b in (("dk", first[1], dk), ("dv", first[2], dv), ("dq", first[0], dq), ("dq again", second[0], dq)):
        assert rel_err(a, b) < 2e-3, name  # bfloat16 rounding of float32 sums taken in another order
