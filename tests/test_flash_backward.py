"""The Triton backward kernels (chapter 07) in the CPU interpreter, against float64 autograd on naive attention.

Every case has lengths that are not multiples of the interpreter's blocks (16 and 32), so that the
ragged edges are exercised; together the cases cover Nq < Nk, Nq > Nk (query rows that see no key
under causal masking), grouped heads, head dims 16 to 128 and one that is not a power of two, float16,
bfloat16 and float32, large logits, and non-contiguous q, k, v and dO.

The non-deterministic backward (``deterministic=False``: one kernel that adds dQ with atomics) is
held to the same tolerances on a subset of the cases, with every score option (flash-attn's accuracy
rule, ``test_flash_options.check_accuracy``) and with packed sequences (``test_flash_varlen``).
"""

import functools

import pytest
import torch

import test_flash_options
from flashcourse import INTERPRET, flash_attention, naive_attention, ops
from flashcourse.kernels.backward import attention_backward
from flashcourse.kernels.configs import KernelConfig
from helpers import make_qkv

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need the interpreter; see test_gpu_backward.py")

# error ‖grad − ref‖ / max(‖ref‖, 1) allowed, against float64 math on the same (rounded) inputs;
# the floor 1 keeps a gradient that is exactly 0 in theory (one key: dq = dk = 0) from dividing by 0
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _error(g, ref):
    return (g.double() - ref).norm().item() / max(ref.norm().item(), 1.0)


def _inputs(B, H, Hkv, Nq, Nk, d, dtype, seed=0, scale_logits=1.0):
    """Rounded q, k, v, dO of ``dtype``; O and L from float64 naive attention, as a forward pass would give."""
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, d, dtype=dtype, seed=seed, scale_logits=scale_logits)
    do = torch.randn(B, H, Nq, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return q, k, v, do


def _reference(q, k, v, do, causal, scale=None):
    """(o, lse) and the float64 autograd gradients of naive attention at the rounded inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse = naive_attention(q64, k64, v64, causal=causal, scale=scale, return_lse=True)
    grads = torch.autograd.grad(o, (q64, k64, v64), do.double())
    return o.detach().to(q.dtype), lse.detach().float(), grads


def _check(q, k, v, do, causal, scale=None, deterministic=True):
    o, lse, refs = _reference(q, k, v, do, causal, scale)
    d = q.shape[-1]
    grads = attention_backward(q, k, v, o, lse, do, causal=causal, scale=scale or d**-0.5,
                               deterministic=deterministic)
    for name, g, ref, like in zip(("dq", "dk", "dv"), grads, refs, (q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert not torch.isnan(g).any(), f"{name} has NaN"
        assert _error(g, ref) < TOL[q.dtype], f"{name}: error {_error(g, ref):.2e} (tolerance {TOL[q.dtype]:.0e})"
    return grads


CASES = [  # B, H, Hkv, Nq, Nk, d, causal, dtype
    pytest.param(1, 2, 2, 1, 1, 16, False, torch.float32, id="N=1"),
    pytest.param(1, 1, 1, 1, 17, 16, True, torch.float32, id="N=1-sees-all-keys-causal"),
    pytest.param(2, 2, 2, 17, 17, 16, True, torch.float32, id="N=17-causal"),
    pytest.param(1, 1, 1, 129, 129, 64, False, torch.float16, id="N=129-d64-fp16"),
    pytest.param(1, 1, 1, 300, 300, 16, True, torch.float32, id="N=300-causal"),
    pytest.param(1, 2, 1, 17, 129, 32, True, torch.bfloat16, id="Nq<Nk-causal-gqa-bf16"),
    pytest.param(1, 4, 2, 33, 20, 16, False, torch.float16, id="Nq>Nk-gqa-fp16"),
    pytest.param(1, 2, 1, 47, 47, 80, True, torch.float32, id="d80-causal-gqa"),
    pytest.param(1, 1, 1, 33, 65, 128, False, torch.bfloat16, id="d128-bf16"),
    pytest.param(1, 1, 1, 40, 40, 40, True, torch.bfloat16, id="d40-causal-bf16"),
]


@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,d,causal,dtype", CASES)
def test_gradients_match_float64_autograd(B, H, Hkv, Nq, Nk, d, causal, dtype):
    _check(*_inputs(B, H, Hkv, Nq, Nk, d, dtype), causal)


def test_large_logits_and_explicit_scale():
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 16, torch.float32, scale_logits=8.0)
    _check(q, k, v, do, causal=True, scale=0.5)


def test_rows_that_see_no_key_get_zero_dq_and_no_nan():
    # causal with Nq > Nk: query i sees key j iff j <= i − 23, so rows 0..22 see nothing
    q, k, v, do = _inputs(1, 2, 1, 40, 17, 16, torch.float16)
    dq, dk, dv = _check(q, k, v, do, causal=True)
    assert torch.equal(dq[:, :, :23], torch.zeros_like(dq[:, :, :23]))


def test_non_contiguous_inputs_and_grad_output():
    B, H, N, d = 1, 2, 37, 32
    # q, k, v as (B, H, N, d) views of (B, N, H, d) storage; dO a strided slice of a wider tensor
    q, k, v = (t.transpose(1, 2) for t in make_qkv(B, N, N, H, H, d, dtype=torch.float16))
    wide = torch.randn(B, H, N, 2 * d, generator=torch.Generator().manual_seed(5)).half()
    do = wide[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or do.is_contiguous())
    grads = _check(q, k, v, do, causal=True)
    o, lse, _ = _reference(q, k, v, do, True)
    contiguous = attention_backward(*(t.contiguous() for t in (q, k, v, o)), lse, do.contiguous(),
                                    causal=True, scale=d**-0.5)
    for g, c in zip(grads, contiguous):
        assert torch.equal(g, c)


def test_deterministic_bitwise():
    q, k, v, do = _inputs(1, 4, 2, 45, 70, 16, torch.float16)
    o, lse, _ = _reference(q, k, v, do, True)
    first = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.25)
    second = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.25)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_wrong_lse_shape_is_explained():
    q, k, v, do = _inputs(1, 1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, H, Nq\)"):
        attention_backward(q, k, v, q, torch.zeros(1, 8), do, causal=False, scale=0.25)


@pytest.mark.parametrize("Hkv,Nq,Nk,causal,dtype", [
    pytest.param(2, 37, 50, True, torch.float32, id="causal-gqa-fp32"),
    pytest.param(4, 45, 21, False, torch.bfloat16, id="Nq>Nk-bf16"),
])
def test_autograd_through_flash_attention(Hkv, Nq, Nk, causal, dtype):
    """torch.autograd through flashcourse.flash_attention (forward kernel + these backward kernels)."""
    q, k, v, do = _inputs(2, 4, Hkv, Nq, Nk, 32, dtype, seed=3)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=causal), leaves, do)
    _, _, refs = _reference(q, k, v, do, causal)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert _error(g, ref) < TOL[dtype], f"{name}: error {_error(g, ref):.2e}"


def test_loss_sum_gives_a_broadcast_grad_output():
    """o.sum().backward() hands the backward a dO with all strides 0: it is read as it is, not copied."""
    q, k, v, _ = _inputs(1, 2, 1, 17, 20, 16, torch.float32, seed=4)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=True).sum(), leaves)
    _, _, refs = _reference(q, k, v, torch.ones(1, 2, 17, 16), True)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert _error(g, ref) < TOL[torch.float32], f"{name}: error {_error(g, ref):.2e}"


# ---------------------------------------------------------------------------------------------
# deterministic=False: dK, dV and the atomic additions of dQ in one kernel

ATOMIC_CASES = [case for case in CASES if case.id in (
    "N=1", "N=300-causal", "Nq<Nk-causal-gqa-bf16", "Nq>Nk-gqa-fp16", "d80-causal-gqa")]


@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,d,causal,dtype", ATOMIC_CASES)
def test_atomic_gradients_match_float64_autograd(B, H, Hkv, Nq, Nk, d, causal, dtype):
    _check(*_inputs(B, H, Hkv, Nq, Nk, d, dtype), causal, deterministic=False)


def test_atomic_dk_dv_are_the_deterministic_ones():
    """The one kernel computes dK and dV exactly as the dK/dV kernel does; dq only sums in another order."""
    q, k, v, do = _inputs(1, 4, 2, 45, 70, 16, torch.float16)
    o, lse, _ = _reference(q, k, v, do, True)
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.25)
    dq_atomic, dk_atomic, dv_atomic = attention_backward(q, k, v, o, lse, do, causal=True, scale=0.25,
                                                         deterministic=False)
    assert torch.equal(dk, dk_atomic) and torch.equal(dv, dv_atomic)
    # float32 sums of the same terms in another order, then rounded to float16: at most one unit apart
    assert torch.allclose(dq_atomic.float(), dq.float(), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("dtype,options", [
    pytest.param(torch.bfloat16, dict(causal=True, window_size=(20, 0), softcap=2.0, alibi_slopes="BH",
                                      dropout_p=0.2), id="all-options-bf16"),
    pytest.param(torch.float32, dict(window_size=(6, 2), softcap=1.5), id="window-softcap-fp32"),
])
def test_atomic_backward_with_score_options(dtype, options, monkeypatch):
    """flash_attention(deterministic=False) under flash-attn's accuracy rule, forward and backward."""
    monkeypatch.setattr(test_flash_options, "flash_attention", functools.partial(flash_attention,
                                                                                deterministic=False))
    test_flash_options.check_accuracy("cpu", dtype, B=1, H=2, Hkv=1, Nq=37, Nk=53, d=16, **options)


@pytest.mark.parametrize("lengths,causal", [("empty", True), ("mixed", False)])
def test_atomic_backward_of_packed_sequences(lengths, causal, monkeypatch):
    """Packed sequences (flash-attn's varlen layout) with NaN rows of no sequence: never read, dq = 0 there."""
    import test_flash_varlen

    monkeypatch.setattr("flashcourse.flash_attn_interface.flash_attention_outputs",
                        functools.partial(ops.flash_attention_outputs, deterministic=False))
    test_flash_varlen.check_varlen("cpu", torch.float16, test_flash_varlen.LENGTHS[lengths], 4, 2, 16,
                                   causal=causal)


def test_deterministic_must_be_a_bool_and_descriptors_need_a_gpu():
    q, k, v, do = _inputs(1, 1, 1, 8, 8, 16, torch.float16)
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        flash_attention(q, k, v, deterministic="no")
    o, lse, _ = _reference(q, k, v, do, False)
    with pytest.raises(ValueError, match="interpreter cannot run"):
        attention_backward(q, k, v, o, lse, do, causal=False, scale=0.25, deterministic=False,
                           dkdvdq_config=KernelConfig(16, 32, use_tma=True))
