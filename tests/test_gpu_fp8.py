"""The FP8 forward compiled for a GPU with FP8 tensor cores, at real sizes: issue 19's accuracy rule.

Rule: the error against float64 attention on the unquantized inputs is at most twice that of the
reference (``fp8.reference_attention``: float32 attention on the same e4m3 inputs, same scales).
"""

import pytest
import torch

from flashcourse import flash_attention, fp8, naive_attention
from flashcourse.kernels import configs
from flashcourse.kernels.forward import attention_forward
from tests.helpers import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < fp8.FP8_CAPABILITY,
                       reason="needs FP8 tensor cores: a GPU of compute capability >= 8.9 (an H100 is 9.0)"),
]
LSE_ATOL = 5e-3  # L does not see P's rounding; what is left is float32 (and FP8 accumulation) rounding


def cuda_qkv(B, H, Hkv, Nq, Nk, d, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, device="cuda", generator=g, dtype=dtype)
                 for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))


def errors(q, k, v, o, lse, *, causal, scaling, rotate):
    """(kernel's error, reference's error) against float64, and L checked against the reference's."""
    exact = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    inputs = fp8.quantize_attention_inputs(q, k, v, scaling=scaling, rotate_qk=rotate)
    ref, ref_lse = fp8.reference_attention(inputs, causal=causal, return_lse=True)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=LSE_ATOL)
    return rel_err(o, exact), rel_err(ref, exact)


SHAPES = [
    # B, H, Hkv, Nq, Nk
    (2, 8, 8, 1000, 1000),  # ragged: not a multiple of any block
    (1, 8, 2, 300, 1777),  # grouped heads, Nq < Nk
    (1, 4, 4, 4096, 4096),
]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B, H, Hkv, Nq, Nk", SHAPES)
def test_gpu_fp8_error_within_twice_the_references(B, H, Hkv, Nq, Nk, d, causal):
    q, k, v = cuda_qkv(B, H, Hkv, Nq, Nk, d, seed=Nq + d)
    for scaling in fp8.SCALINGS:
        for rotate in (False, True):
            o, lse = flash_attention(q, k, v, causal=causal, fp8=True, fp8_scaling=scaling, rotate=rotate,
                                     return_lse=True)
            assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
            mine, ref = errors(q, k, v, o, lse, causal=causal, scaling=scaling, rotate=rotate)
            assert mine <= 2 * ref, (scaling, rotate, mine, ref)


@pytest.mark.parametrize("d", [64, 128])
def test_gpu_fp8_every_candidate_configuration(d):
    """Each FP8 launch configuration the autotuner (and benchmarks/fp8.py) may pick, with descriptor
    loads and with pointer loads, on ragged lengths, causal."""
    q, k, v = cuda_qkv(1, 4, 2, 1000, 1000, d, seed=d)
    inputs = fp8.quantize_attention_inputs(q, k, v)
    for shape in configs.CANDIDATES["forward"][(d, 1)]:
        for use_tma in (True, False):
            config = configs.KernelConfig(*shape, use_tma=use_tma)
            o, lse = attention_forward(inputs.q, inputs.k, inputs.v, causal=True, scale=d**-0.5,
                                       descale=inputs[3:], config=config)
            mine, ref = errors(q, k, v, o, lse, causal=True, scaling="block", rotate=False)
            assert mine <= 2 * ref, (config, mine, ref)


def test_gpu_fp8_inputs_already_quantized():
    q, k, v = cuda_qkv(2, 4, 4, 513, 513, 128, seed=3)
    (q8, qd), (k8, kd), (v8, vd) = (fp8.quantize(t, "block") for t in (q, k, v))
    o8 = flash_attention(q8, k8, v8, descale=(qd, kd, vd), causal=True)
    assert torch.equal(o8, flash_attention(q, k, v, fp8=True, causal=True))


def test_gpu_fp8_rotation_wins_back_accuracy_on_outlier_channels():
    q, k, v = fp8.outlier_inputs(B=2, H=8, N=2048, d=128, channels=4, factor=20.0, device="cuda",
                                 dtype=torch.bfloat16)
    exact = naive_attention(q.double(), k.double(), v.double())
    plain, rotated = (rel_err(flash_attention(q, k, v, fp8=True, rotate=r), exact) for r in (False, True))
    assert rotated < plain / 2, (plain, rotated)


def test_gpu_fp8_refuses_a_gradient():
    q, k, v = cuda_qkv(1, 2, 2, 64, 64, 64, seed=0)
    with pytest.raises(RuntimeError, match="no backward"):
        flash_attention(q.requires_grad_(), k, v, fp8=True)
