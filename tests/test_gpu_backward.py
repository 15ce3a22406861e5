"""The Triton backward kernels on a CUDA GPU at real sizes, against float64 autograd and PyTorch SDPA.

Each case's error ‖grad − ref‖ / ‖ref‖ against float64 autograd on naive attention must stay under a
per-dtype tolerance and, where SDPA computes the same function (no causal mask, or Nq == Nk), within
a small factor of the error of SDPA's own gradients in the same dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from flashcourse import naive_attention
from flashcourse.kernels.backward import attention_backward
from helpers import make_qkv, rel_err

pytestmark = pytest.mark.gpu

# float32 under PyTorch's default matmul precision "highest": IEEE float32 products (the package's contract)
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}

CASES = [  # B, H, Hkv, Nq, Nk, d, causal, dtype
    pytest.param(2, 8, 8, 1024, 1024, 64, False, torch.float16, id="N1024-d64-fp16"),
    pytest.param(2, 8, 8, 1024, 1024, 64, True, torch.bfloat16, id="N1024-d64-causal-bf16"),
    pytest.param(1, 8, 2, 1000, 1000, 128, True, torch.float16, id="N1000-d128-causal-gqa-fp16"),
    pytest.param(1, 4, 4, 777, 2048, 128, True, torch.bfloat16, id="Nq<Nk-causal-bf16"),
    pytest.param(1, 4, 4, 2048, 300, 80, True, torch.float16, id="Nq>Nk-causal-d80-fp16"),
    pytest.param(1, 4, 4, 1030, 1030, 256, False, torch.bfloat16, id="d256-bf16"),
    pytest.param(1, 4, 4, 513, 513, 40, True, torch.float16, id="d40-causal-fp16"),
    pytest.param(1, 4, 2, 1024, 777, 64, False, torch.float32, id="Nq>Nk-gqa-fp32"),
    pytest.param(1, 4, 4, 4096, 4096, 128, True, torch.bfloat16, id="N4096-d128-causal-bf16"),
    pytest.param(1, 4, 4, 4096, 4096, 64, False, torch.float16, id="N4096-d64-fp16"),
]


def _sdpa_grads(q, k, v, do, causal):
    """SDPA's own gradients in the inputs' dtype (its default backend choice)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    return torch.autograd.grad(o, (q, k, v), do)


@pytest.mark.autotune
@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,d,causal,dtype", CASES)
def test_gradients_at_real_sizes(B, H, Hkv, Nq, Nk, d, causal, dtype):
    q, k, v = (t.cuda() for t in make_qkv(B, H, Hkv, Nq, Nk, d, dtype=dtype, seed=Nq + d))
    do = torch.randn(B, H, Nq, d, device="cuda", dtype=dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse = naive_attention(q64, k64, v64, causal=causal, return_lse=True)
    refs = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    grads = attention_backward(q, k, v, o64.detach().to(dtype), lse.detach().float(), do,
                               causal=causal, scale=d**-0.5)
    theirs = _sdpa_grads(q, k, v, do, causal) if dtype != torch.float32 and (not causal or Nq == Nk) else None
    for i, (name, g, ref) in enumerate(zip(("dq", "dk", "dv"), grads, refs)):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = rel_err(g, ref)
        assert err < TOL[dtype], f"{name}: error {err:.2e}"
        if theirs is not None:
            sdpa_err = rel_err(theirs[i], ref)
            assert err < 2 * sdpa_err + 1e-4, f"{name}: error {err:.2e}, SDPA's {sdpa_err:.2e}"


def test_deterministic_on_gpu():
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 1500, 1500, 128, dtype=torch.bfloat16))
    do = torch.randn_like(q)
    o, lse = naive_attention(q, k, v, causal=True, return_lse=True)
    first = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.1)
    second = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_grad_output_on_gpu():
    q, k, v = (t.cuda() for t in make_qkv(1, 4, 4, 1024, 1024, 64, dtype=torch.float16))
    do = torch.randn(1, 1024, 4, 64, device="cuda", dtype=torch.float16).transpose(1, 2)
    o, lse = naive_attention(q, k, v, causal=True, return_lse=True)
    strided = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.125)
    dense = attention_backward(q, k, v, o, lse, do.contiguous(), causal=True, scale=0.125)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)
