"""flash-attn's options on the GPU at real sizes: the full product of option × causal × heads × lengths
× dtype, forward and backward, with flash-attn's accuracy rule (test_flash_options.check_accuracy:
at most twice the error of the same reference in the inputs' precision, plus 1e-5).

float32 runs at PyTorch's default matmul precision "highest" (IEEE float32 products, see conftest.py).
Each test pins one launch configuration per kernel (``pinned_configs``), so that the product compiles
each option's kernels once instead of autotuning every candidate for every combination; the autotuned
path is tested on the plain kernels (test_gpu_forward.py, test_gpu_backward.py) and below.
"""

import pytest
import torch

from flashcourse import flash_attention
from flash_reference import max_error, reference_attention
from helpers import make_qkv
from test_flash_options import HEADS, OPTIONS as CPU_OPTIONS, check_accuracy

pytestmark = pytest.mark.gpu

# the options of the CPU tests with windows 25 times wider, for N ~ 1000
OPTIONS = {name: {k: tuple(25 * w if w > 0 else w for w in v) if k == "window_size" else v for k, v in opts.items()}
           for name, opts in CPU_OPTIONS.items()}
LENGTHS = {"equal": (1000, 1000), "q<k": (300, 1024), "q>k": (1024, 300)}


@pytest.fixture
def pinned_configs(monkeypatch):
    """One configuration per kernel, valid for d <= 128 in every dtype (see configs.fits)."""
    for kernel, config in (("FORWARD", "64,64,4,2"), ("DKDV", "32,64,4,2"), ("DQ", "64,32,4,2")):
        monkeypatch.setenv(f"FLASHCOURSE_CONFIG_{kernel}", config)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_options_full_product(option, causal, heads, lengths, dtype, pinned_configs):
    H, Hkv = HEADS[heads]
    Nq, Nk = LENGTHS[lengths]
    check_accuracy("cuda", dtype, 2, H, Hkv, Nq, Nk, 64, seed=Nq + Nk, causal=causal, **OPTIONS[option])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_options_d128(option, dtype, pinned_configs):
    """d = 128, and float32 in IEEE precision."""
    check_accuracy("cuda", dtype, 1, 4, 2, 777, 1000, 128, seed=3, causal=True, **OPTIONS[option])


@pytest.mark.autotune
@pytest.mark.parametrize("option", ["window-both", "softcap", "alibi-BH", "dropout"])
def test_gpu_options_autotuned(option):
    """The same options through the autotuner (every candidate configuration compiled and timed)."""
    check_accuracy("cuda", torch.float16, 2, 8, 2, 2048, 2048, 128, seed=5, causal=True, **OPTIONS[option])


def test_gpu_dropout_keep_rate_and_repeatability():
    q, k, v = make_qkv(2, 8, 8, 2048, 2048, 64, dtype=torch.bfloat16, seed=1, device="cuda")
    torch.manual_seed(0)
    o1, _, p1 = flash_attention(q, k, v, dropout_p=0.17, return_attn_probs=True)
    torch.manual_seed(0)
    o2, _, p2 = flash_attention(q, k, v, dropout_p=0.17, return_attn_probs=True)
    assert torch.equal(o1, o2) and torch.equal(torch.signbit(p1), torch.signbit(p2))
    assert abs(torch.signbit(p1).float().mean().item() - 0.17) < 1e-3  # 67M weights: sd 5e-5


def test_gpu_blocks_outside_the_window_are_never_read():
    """128 queries see only keys >= 3904 (window (64, 64), Nk − Nq = 3968): keys 0..3583 lie in blocks
    wholly outside for every candidate block size; poisoned with NaN, nothing becomes NaN."""
    q, k, v = make_qkv(1, 4, 2, 128, 4096, 64, dtype=torch.float16, seed=2, device="cuda")
    k[:, :, :3584] = float("nan")
    v[:, :, :3584] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, window_size=(64, 64))
    dq, dk, dv = torch.autograd.grad(o.sum(), leaves)
    assert all(t.isfinite().all() for t in (o, dq, dk, dv))
    assert (dk[:, :, :3584] == 0).all() and (dv[:, :, :3584] == 0).all()
    want = reference_attention(q, k[:, :, 3584:], v[:, :, 3584:], window_size=(64, 64))
    assert max_error(o, want) < 2e-3
