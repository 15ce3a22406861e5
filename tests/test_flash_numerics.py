"""Numerical contracts of the Triton kernels: bfloat16 rounding, the float32 dot precision, NaN and
infinity in the inputs, and the supported head dims. Run on the GPU when there is one (``device``)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashcourse import flash_attention, naive_attention, tiled_attention
from flashcourse.kernels.common import dot_args, quiet_interpreter, to_dtype
from helpers import make_qkv, rel_err


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, to_dtype(tl.load(X + offs), Y.dtype.element_ty))


def _edge_values() -> torch.Tensor:
    """float32 values where a float32 -> bfloat16 conversion can go wrong, then random ones of every size."""
    named = [0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 2.0**-126,
             1e-40, -1e-40, 1e-45]
    bits = [
        0x3F808000,  # 1 + 2^-8: a tie between two bfloat16, the lower one even -> rounds down
        0x3F818000,  # a tie whose lower neighbour is odd -> rounds up
        0x3F807FFF, 0x3F808001,  # just below and above a tie
        0x7F7FFFFF,  # the largest float32: rounds to inf
        0x7F7F7FFF,  # the largest float32 that stays finite
        0x00008000, 0x00018000,  # ties among subnormals
        0x7FFFFFFF, 0xFFC00001, 0x7F800001,  # NaNs whose payload would carry into the exponent
    ]
    g = torch.Generator().manual_seed(0)
    n = 2048 - len(named) - len(bits)
    random = torch.randn(n, generator=g) * 10.0 ** torch.randint(-44, 38, (n,), generator=g)
    as_float = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.cat([torch.tensor(named), as_float, random]).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype_rounds_like_torch(dtype, device):
    """The kernels' narrowing cast agrees bit for bit with PyTorch's (round to nearest, ties to even)."""
    x = _edge_values().to(device)
    y = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    with quiet_interpreter():  # 3.4e38 overflows float16: NumPy would warn
        _cast_kernel[(1,)](x, y, x.numel())
    want = x.to(dtype)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert same.all(), f"{(~same).sum()} values differ, e.g. {x[~same][:4].tolist()} -> {y[~same][:4].tolist()}"


def _errors(fn, q, k, v, do, causal):
    """rel_err of O, dq, dk, dv computed by fn in q's dtype, against float64 naive attention."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, causal=causal)
    got = (o, *torch.autograd.grad(o, leaves, do))
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = naive_attention(*leaves64, causal=causal)
    want = (o64, *torch.autograd.grad(o64, leaves64, do.double()))
    return [rel_err(g, w) for g, w in zip(got, want)]


@pytest.mark.parametrize("Nq, Nk, d, causal, H, Hkv", [
    (299, 3, 128, True, 1, 1),  # issue 10: dV error 0.031 when the interpreter truncated
    (70, 70, 32, False, 2, 1),
    (45, 70, 64, True, 2, 2),
    (33, 17, 16, False, 2, 1),
])
def test_bfloat16_errors_at_most_twice_those_of_pytorch(Nq, Nk, d, causal, H, Hkv, device):
    """bf16 O, dq, dk, dv: error against float64 at most 2x that of tiled_attention in bf16, which
    rounds through PyTorch (truncating P and dS instead gives 2.3-3.9x on these cases)."""
    q, k, v = (t.to(device) for t in make_qkv(B=1, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d, dtype=torch.bfloat16, seed=d))
    do = torch.randn(1, H, Nq, d, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    ours = _errors(flash_attention, q, k, v, do, causal)
    pytorch = _errors(tiled_attention, q, k, v, do, causal)
    for name, e, e_pt in zip(("O", "dq", "dk", "dv"), ours, pytorch):
        assert e <= 2 * e_pt, f"{name}: error {e:.2e}, PyTorch's {e_pt:.2e}"


def test_float32_dot_precision_follows_pytorch():
    """The float32 contract: "highest" (PyTorch's default) multiplies in IEEE float32, "high" and
    "medium" allow TF32; half-precision inputs keep Triton's default."""
    before = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert dot_args(torch.float32)["DOT_PRECISION"] == want
            assert dot_args(torch.float16)["DOT_PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_nan_inputs_raise_no_numpy_warning(device):
    """NaN in q reaches the output of its row only, and the interpreter's NumPy warnings stay inside."""
    q, k, v = (t.to(device).requires_grad_() for t in make_qkv(B=1, H=2, Nq=20, Nk=20, d=16, dtype=torch.float32))
    with torch.no_grad():
        q[0, 1, 5, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, NumPy's RuntimeWarning included, fails the test
        o = flash_attention(q, k, v, causal=True)
        o.sum().backward()
    assert o[0, 1, 5].isnan().all() and not o[0, 0].isnan().any()
    assert np.isnan(q.grad[0, 1, 5].cpu().numpy()).all()


@pytest.mark.parametrize("causal", [False, True])
def test_infinite_key_gives_nan_rows_as_sdpa(causal, device):
    """+inf in a key makes the scores of the rows that see it +inf where q_i0 > 0: those rows are NaN,
    as in SDPA; rows that get -inf only drop that key. No check on the data (it would cost a host
    sync and break torch.compile graphs)."""
    q, k, v = (t.to(device) for t in make_qkv(B=1, H=2, Nq=24, Nk=24, d=16, dtype=torch.float32, seed=3))
    k[0, :, 10, 0] = float("inf")  # q_i · k_10 = +inf where q_i0 > 0, -inf where q_i0 < 0
    o = flash_attention(q, k, v, causal=causal)
    # softmax(S) V in float64, masked with masked_fill (SDPA's additive mask would make inf - inf = NaN
    # also in rows that never see key 10)
    s = q.double().cpu() @ k.double().cpu().transpose(-2, -1) / 4
    if causal:
        s = s.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(s, dim=-1) @ v.double().cpu()
    nan_rows = want.isnan().any(-1)
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(o.isnan().any(-1).cpu(), nan_rows)
    assert torch.allclose(o.cpu()[~nan_rows].double(), want[~nan_rows], atol=1e-5)
    if not causal:
        sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert torch.equal(sdpa.isnan().any(-1).cpu(), nan_rows)


@pytest.mark.parametrize("d", [1, 8, 256])
def test_supported_head_dims_are_1_to_256(d, device):
    """Any d from 1 to 256: the kernels pad d to a power of two >= 16 on chip."""
    q, k, v = (t.to(device).requires_grad_() for t in make_qkv(B=1, H=1, Nq=17, Nk=20, d=d, dtype=torch.float32))
    o = flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = naive_attention(*leaves, causal=True)
    assert rel_err(o, o64) < 1e-5
    for g, g64 in zip(grads, torch.autograd.grad(o64.sum(), leaves)):
        assert rel_err(g, g64) < 1e-5


def test_head_dim_above_256_is_refused(device):
    q, k, v = (t.to(device) for t in make_qkv(B=1, H=1, Nq=4, d=257, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"head dim d = 257 is too large .*d <= 256"):
        flash_attention(q, k, v)
