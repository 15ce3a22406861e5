"""The Triton forward kernel (chapter 05) in the CPU interpreter, against float64 naive attention."""

import pytest
import torch

from flashcourse import INTERPRET, flash_attention, naive_attention
from flashcourse.kernels import configs
from flashcourse.kernels.forward import attention_forward
from tests.helpers import make_qkv, rel_err

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need the interpreter; see test_gpu_forward.py")

# output tolerance (‖O − O_ref‖ / ‖O_ref‖) per input dtype: rounding of the inputs and of P to the dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check_forward(q, k, v, *, causal=False, scale=None, tol=TOL, lse_atol=1e-3, **launch):
    """Run the kernel into a NaN-poisoned output; compare O and L with float64 naive attention."""
    B, H, Nq, d = q.shape
    s = d**-0.5 if scale is None else scale
    out = torch.full((B, H, Nq, d), float("nan"), dtype=q.dtype, device=q.device)
    o, lse = attention_forward(q, k, v, causal=causal, scale=s, out=out, **launch)
    assert o.data_ptr() == out.data_ptr()
    assert not o.isnan().any(), "some output elements were never written"
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Nq) and lse.is_contiguous()
    ref_o, ref_lse = naive_attention(q.double(), k.double(), v.double(), causal=causal, scale=s, return_lse=True)
    assert o.dtype == q.dtype
    assert rel_err(o, ref_o) < tol[q.dtype]
    # rows that see no key: L = −inf exactly, and O = 0
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    seen = torch.isfinite(ref_lse)
    assert (o[~seen] == 0).all()
    assert torch.allclose(lse[seen].double(), ref_lse[seen], rtol=1e-4, atol=lse_atol)
    return o, lse


# the edge-case grid, crossed by hand rather than as a full product: each line varies what matters
GRID = [
    # Nq, Nk, d, causal, H, Hkv, dtype
    (1, 1, 16, False, 2, 2, torch.float32),
    (1, 1, 16, True, 2, 1, torch.float16),
    (17, 17, 16, True, 2, 2, torch.float32),
    (17, 17, 40, False, 4, 2, torch.float16),
    (129, 129, 64, True, 2, 1, torch.float16),
    (129, 129, 128, False, 2, 2, torch.float32),
    (300, 300, 40, True, 2, 2, torch.float32),
    (300, 300, 64, False, 1, 1, torch.float16),
    # Nq < Nk: the queries are the last Nq positions (decoding against a cache)
    (17, 300, 64, True, 4, 2, torch.float16),
    (1, 129, 128, True, 2, 1, torch.float32),
    (129, 300, 16, False, 2, 2, torch.float32),
    # Nq > Nk: the first Nq − Nk query rows see no key when causal
    (300, 17, 40, True, 2, 1, torch.float32),
    (129, 17, 64, True, 2, 2, torch.float16),
    (300, 129, 128, False, 2, 1, torch.float16),
    # head dims that are not powers of two, and the largest
    (65, 65, 80, True, 2, 2, torch.float16),
    (33, 47, 96, False, 2, 1, torch.float32),
    (40, 40, 256, True, 1, 1, torch.float16),
]


@pytest.mark.parametrize("Nq, Nk, d, causal, H, Hkv, dtype", GRID)
def test_matches_float64_reference(Nq, Nk, d, causal, H, Hkv, dtype):
    q, k, v = make_qkv(B=1, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d, dtype=dtype, seed=Nq + Nk + d)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("Nq, Nk, d, causal, H, Hkv, dtype", [GRID[4], GRID[8], GRID[11], GRID[14]])
def test_pointer_loads_match_too(Nq, Nk, d, causal, H, Hkv, dtype):
    """The grid above loads K_j, V_j through tensor descriptors where it can; masked pointers must agree."""
    q, k, v = make_qkv(B=1, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d, dtype=dtype, seed=Nq + Nk + d)
    assert configs.tma_compatible(k, v)
    check_forward(q, k, v, causal=causal, use_tma=False)
    check_forward(q, k, v, causal=causal, use_tma=True)


def test_unaligned_rows_fall_back_to_pointers():
    """d = 20 in float16: rows of 40 bytes are not 16-byte aligned, so no descriptor can describe K."""
    q, k, v = make_qkv(B=1, H=2, Nq=33, Nk=33, d=20, dtype=torch.float16, seed=8)
    assert not configs.tma_compatible(k)
    check_forward(q, k, v, causal=True)
    with pytest.raises(ValueError, match="use_tma=True needs"):
        attention_forward(q, k, v, causal=True, scale=0.25, use_tma=True)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_in_the_interpreter_is_correct(causal):
    """The interpreter's tl.dot is wrong for bf16; the kernel upcasts there, so bf16 is right (not garbage)."""
    q, k, v = make_qkv(B=1, H=2, Hkv=1, Nq=45, Nk=70, d=64, dtype=torch.bfloat16, seed=3)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (64, 16)])
def test_other_block_shapes(block_m, block_n):
    """The causal split (unmasked blocks, then diagonal blocks) holds for any B_r, B_c, ragged or not."""
    q, k, v = make_qkv(B=1, H=1, Nq=75, Nk=90, d=32, dtype=torch.float32, seed=block_m + block_n)
    check_forward(q, k, v, causal=True, block_m=block_m, block_n=block_n)


def test_non_contiguous_inputs_are_read_through_strides():
    """q, k, v stored (B, N, H, d) and viewed as (B, H, N, d): strides passed, nothing copied."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 33, 4, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, 50, 2, 64, generator=g).transpose(1, 2)
    v = torch.randn(2, 64, 50, 2, generator=g).permute(0, 3, 2, 1)  # stride 1 along N, not d
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_forward(q, k, v, causal=True)
    check_forward(q, k, v, causal=False)


def test_large_logits_stay_finite():
    """Scores of size ~100 · ‖q‖‖k‖ overflow a naive exp; the online softmax subtracts the running max."""
    q, k, v = make_qkv(B=1, H=2, Nq=40, Nk=40, d=32, dtype=torch.float32, scale_logits=100.0, seed=5)
    o, lse = check_forward(q, k, v, causal=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


def test_scale_is_used():
    q, k, v = make_qkv(B=1, H=1, Nq=20, Nk=30, d=16, dtype=torch.float32, seed=11)
    check_forward(q, k, v, scale=0.05)


def test_public_function_matches_contract():
    q, k, v = make_qkv(B=2, H=2, Hkv=1, Nq=19, Nk=23, d=16, dtype=torch.float16, seed=2)
    o, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    ref_o, ref_lse = naive_attention(q, k, v, causal=True, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    assert rel_err(o, ref_o) < 2e-3
    assert torch.allclose(lse, ref_lse, atol=1e-3)
    assert torch.equal(flash_attention(q, k, v), attention_forward(q, k, v, causal=False, scale=0.25)[0])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: make_qkv(d=300, Nq=4, H=1, B=1, dtype=torch.float32), ValueError, "head dim d = 300"),
        (lambda: make_qkv(d=16, Nq=4, H=1, B=1, dtype=torch.float64), TypeError, "float16, bfloat16 and float32"),
        (lambda: make_qkv(d=16, Nq=4, H=3, Hkv=2, B=1, dtype=torch.float32), ValueError, "H % Hkv"),
        (lambda: (torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)), ValueError, "4 dimensions"),
        (
            lambda: (torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16, device="meta"), torch.randn(1, 1, 4, 16)),
            ValueError,
            "move all three to one device",
        ),
    ],
)
def test_bad_inputs_are_explained(make, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        flash_attention(q, k, v)


def test_gradient_matches_reference():
    """Autograd through the custom op reaches the backward kernels (chapter 07)."""
    q, k, v = make_qkv(B=1, H=2, Hkv=1, Nq=20, Nk=33, d=16, dtype=torch.float32, seed=9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=True), (q, k, v), do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(naive_attention(qd, kd, vd, causal=True), (qd, kd, vd), do.double())
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and rel_err(g, r) < 1e-4
