"""The Triton forward kernel compiled on a GPU, at real sizes: against float64 attention and SDPA."""

import pytest
import torch
import torch.nn.functional as F

from flashcourse import flash_attention, naive_attention
from flashcourse._checks import causal_mask
from flashcourse.kernels import configs
from tests.helpers import rel_err
from tests.test_flash_forward import check_forward

pytestmark = pytest.mark.gpu

# float32 under PyTorch's default matmul precision "highest": IEEE float32 products (the package's
# float32 contract); test_gpu_float32_tf32_when_allowed covers "high" (TF32)
GPU_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}
TF32_TOL = {torch.float32: 5e-3}


def cuda_qkv(B, H, Hkv, Nq, Nk, d, dtype, seed, layout="bhnd"):
    """Random q (B, H, Nq, d), k, v (B, Hkv, Nk, d) on the GPU; layout "bnhd" stores them (B, N, H, d)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "bnhd":
        make = lambda h, n: torch.randn(B, n, h, d, device="cuda", generator=g, dtype=dtype).transpose(1, 2)  # noqa: E731
    else:
        make = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g, dtype=dtype)  # noqa: E731
    return make(H, Nq), make(Hkv, Nk), make(Hkv, Nk)


def sdpa_error(q, k, v, causal, ref):
    """SDPA's own error in the input dtype (bottom-right causal as an explicit mask; empty rows -> 0)."""
    mask = causal_mask(q.shape[2], k.shape[2], device=q.device) if causal else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return rel_err(torch.nan_to_num(o, nan=0.0), ref)


GRID = [
    # B, H, Hkv, Nq, Nk, d, causal, dtype
    (2, 16, 16, 1000, 1000, 64, False, torch.float16),
    (2, 16, 4, 1000, 1000, 64, True, torch.bfloat16),
    (1, 16, 16, 4096, 4096, 128, True, torch.float16),
    (1, 8, 8, 4096, 4096, 128, False, torch.bfloat16),
    (1, 8, 2, 129, 4096, 128, True, torch.float16),
    (1, 8, 8, 4096, 129, 128, True, torch.bfloat16),
    (2, 4, 1, 17, 17, 128, False, torch.float16),
    (1, 2, 2, 1, 1, 64, True, torch.bfloat16),
    (1, 4, 4, 1000, 777, 40, True, torch.float16),
    (1, 4, 2, 513, 1000, 80, False, torch.bfloat16),
    (1, 4, 4, 300, 300, 96, True, torch.float16),
    (1, 4, 4, 1000, 1000, 16, True, torch.bfloat16),
    (1, 4, 4, 1000, 1000, 256, True, torch.bfloat16),
    (1, 4, 2, 777, 1000, 256, False, torch.float16),
    (1, 4, 2, 1000, 1000, 64, True, torch.float32),
    (1, 4, 4, 300, 1000, 128, False, torch.float32),
]


@pytest.mark.autotune
@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, d, causal, dtype", GRID)
def test_gpu_matches_float64_and_sdpa(B, H, Hkv, Nq, Nk, d, causal, dtype):
    q, k, v = cuda_qkv(B, H, Hkv, Nq, Nk, d, dtype, seed=Nq + Nk + d)
    o, _ = check_forward(q, k, v, causal=causal, tol=GPU_TOL, lse_atol=1e-3)
    if dtype != torch.float32:  # float32: the tolerance above is already at IEEE level
        ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
        assert rel_err(o, ref) <= 2 * sdpa_error(q, k, v, causal, ref) + 1e-4


@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, d, causal, dtype", [GRID[1], GRID[5], GRID[8], GRID[14]])
def test_gpu_pointer_loads(B, H, Hkv, Nq, Nk, d, causal, dtype):
    """K_j, V_j through masked pointer loads only, then through tensor descriptors only."""
    q, k, v = cuda_qkv(B, H, Hkv, Nq, Nk, d, dtype, seed=Nq + Nk + d)
    check_forward(q, k, v, causal=causal, tol=GPU_TOL, lse_atol=1e-3, use_tma=False)
    check_forward(q, k, v, causal=causal, tol=GPU_TOL, lse_atol=1e-3, use_tma=True)


def test_gpu_unaligned_rows_fall_back_to_pointers():
    q, k, v = cuda_qkv(1, 4, 2, 1000, 1000, 20, torch.float16, seed=4)
    assert not configs.tma_compatible(k)
    check_forward(q, k, v, causal=True, tol=GPU_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_strided_layout_and_large_logits(dtype):
    """(B, N, H, d) storage viewed as (B, H, N, d), and scores ~100× larger: finite and right."""
    q, k, v = cuda_qkv(2, 16, 4, 2048, 2048, 128, dtype, seed=1, layout="bnhd")
    assert not q.is_contiguous()
    check_forward(q, k, v, causal=True, tol=GPU_TOL)
    o, lse = check_forward(q * 10, k * 10, v, causal=False, tol=GPU_TOL, lse_atol=0.5)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


@pytest.mark.autotune
def test_gpu_autotuning_runs_once_per_key():
    from flashcourse.kernels.forward import _attn_fwd_tuned

    q, k, v = cuda_qkv(1, 4, 4, 1500, 1500, 64, torch.float16, seed=2)
    flash_attention(q, k, v)
    seen = dict(_attn_fwd_tuned.cache)
    q2, k2, v2 = cuda_qkv(1, 4, 4, 1700, 1700, 64, torch.float16, seed=3)  # same bucket (2048)
    flash_attention(q2, k2, v2)
    assert _attn_fwd_tuned.cache == seen


def test_gpu_cpu_tensor_is_refused():
    q, k, v = cuda_qkv(1, 1, 1, 8, 8, 16, torch.float16, seed=0)
    with pytest.raises(ValueError, match="move the inputs to the GPU"):
        flash_attention(q.cpu(), k.cpu(), v.cpu())
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.cpu(), v)


def test_gpu_float32_tf32_when_allowed():
    """torch.set_float32_matmul_precision("high") lets the kernels multiply float32 in TF32, as
    PyTorch's matmuls then do: faster, and visibly less exact than "highest"."""
    q, k, v = cuda_qkv(1, 4, 4, 1000, 1000, 64, torch.float32, seed=6)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True)
    ieee = rel_err(flash_attention(q, k, v, causal=True), ref)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        o, _ = check_forward(q, k, v, causal=True, tol=TF32_TOL, lse_atol=2e-2)
    finally:
        torch.set_float32_matmul_precision(before)
    assert ieee < 2e-5 < rel_err(o, ref)
