"""The layers of chapter 08 (flashcourse/nn.py): flash_attn_func, FlashAttention, MultiHeadAttention.

Checked against PyTorch SDPA in float64, causal and not, with grouped heads and strided (B, N, H, d)
views. Every test runs on the ``device`` fixture: the "flash" backend is the Triton kernels, compiled on
a GPU and interpreted on the CPU; float32 is IEEE on both (precision "highest", see conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from flashcourse import FlashAttention, MultiHeadAttention, flash_attn_func
from flashcourse.nn import BACKENDS
from helpers import make_qkv, sdpa_reference


def bnhd(*tensors):
    """(B, H, N, d) -> the flash-attn layout (B, N, H, d), as strided views (no copy)."""
    return [t.transpose(1, 2) for t in tensors]


def reference_bnhd(q, k, v, causal=False, scale=None):
    """SDPA in float64 on (B, N, H, d) tensors."""
    return sdpa_reference(*bnhd(q, k, v), causal=causal, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("Nq,Nk,H,Hkv", [(17, 17, 4, 4), (17, 17, 4, 2), (5, 23, 2, 1), (23, 5, 2, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backends_match_sdpa(name, causal, Nq, Nk, H, Hkv, device):
    q, k, v = make_qkv(B=2, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=16, dtype=torch.float32, device=device)
    O = BACKENDS[name](q, k, v, causal=causal, scale=0.3)
    assert O.shape == q.shape and O.dtype == torch.float32
    torch.testing.assert_close(O.double(), sdpa_reference(q, k, v, causal, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_matches_sdpa(causal, H, Hkv, device):
    q, k, v = bnhd(*make_qkv(B=2, H=H, Hkv=Hkv, Nq=17, d=16, dtype=torch.float32, device=device))  # strided views
    O = flash_attn_func(q, k, v, causal=causal)
    assert O.shape == (2, 17, H, 16)
    torch.testing.assert_close(O.double(), reference_bnhd(q, k, v, causal), atol=1e-5, rtol=1e-5)
    O = flash_attn_func(*(t.contiguous() for t in (q, k, v)), causal=causal, softmax_scale=0.5)
    torch.testing.assert_close(O.double(), reference_bnhd(q, k, v, causal, scale=0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_gradients_match_sdpa(causal, device):
    q, k, v = (t.requires_grad_() for t in make_qkv(B=1, H=4, Hkv=2, Nq=17, d=16, dtype=torch.float32, device=device))
    do = torch.randn(1, 17, 4, 16).to(device)
    got = torch.autograd.grad(flash_attn_func(*bnhd(q, k, v), causal=causal), (q, k, v), do)
    want = torch.autograd.grad(reference_bnhd(*bnhd(q, k, v), causal), (q, k, v), do.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_module_on_packed_qkv(causal, device):
    qkv = torch.randn(2, 17, 3, 2, 16).to(device)
    q, k, v = qkv.unbind(2)
    module = FlashAttention(causal=causal, softmax_scale=0.5)
    torch.testing.assert_close(module(qkv).double(), reference_bnhd(q, k, v, causal, scale=0.5), atol=1e-5, rtol=1e-5)
    # causal may be overridden per call, as in flash-attn's FlashSelfAttention
    torch.testing.assert_close(module(qkv, causal=not causal).double(), reference_bnhd(q, k, v, not causal, scale=0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,hint", [
    ((2, 17, 96), r"qkv.view\(B, N, 3, H, 32 // H\)"),
    ((2, 17, 3, 32), r"qkv.view\(B, N, 3, H, 32 // H\)"),
    ((2, 3, 17, 2, 16), r"qkv.movedim\(1, 2\)"),
    ((2, 17, 2, 16), r"torch.stack\(\[q, k, v\], dim=2\)"),
])
def test_flash_attention_module_explains_a_wrong_packing(shape, hint):
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, d\)") as err:
        FlashAttention()(torch.randn(shape))
    assert err.match(hint)
    with pytest.raises(TypeError, match="torch.Tensor"):
        FlashAttention()([1, 2, 3])


def test_flash_attn_func_wants_the_flash_attn_layout():
    q = torch.randn(17, 2, 16)
    with pytest.raises(ValueError, match=r"q must be a 4-d tensor in the flash-attn layout \(B, N, H, d\)"):
        flash_attn_func(q, q, q)


def mha_reference(mha, x):
    """The module's own weights, applied step by step, with float64 SDPA as the attention."""
    B, N, E = x.shape
    H, Hkv, d = mha.num_heads, mha.num_kv_heads, mha.head_dim
    q, k, v = F.linear(x, mha.qkv_proj.weight, mha.qkv_proj.bias).split([H * d, Hkv * d, Hkv * d], dim=-1)
    q, k, v = (t.reshape(B, N, -1, d) for t in (q, k, v))
    o = reference_bnhd(q, k, v, mha.causal).float()
    return F.linear(o.reshape(B, N, E), mha.out_proj.weight, mha.out_proj.bias)


@pytest.mark.parametrize("num_kv_heads,bias", [(None, False), (1, True)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_multi_head_attention_matches_sdpa(name, causal, num_kv_heads, bias, device):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 2, num_kv_heads=num_kv_heads, causal=causal, backend=name, bias=bias).to(device)
    x = torch.randn(2, 17, 32).to(device)
    y = mha(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, mha_reference(mha, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["flash", "tiled", "naive"])
def test_multi_head_attention_gradients_match_sdpa(name, device):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, backend=name).to(device)
    x = torch.randn(2, 17, 32).to(device).requires_grad_()
    grads = {}
    for backend in (name, "sdpa"):
        mha.backend = backend
        grads[backend] = torch.autograd.grad(mha(x).square().sum(), [x, *mha.parameters()])
    for g, w in zip(grads[name], grads["sdpa"]):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_multi_head_attention_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        MultiHeadAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash2'; choose one of 'flash', 'tiled'"):
        MultiHeadAttention(32, 4, backend="flash2")
    mha = MultiHeadAttention(32, 4, backend="naive")
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, N, embed_dim=32\), got shape \(17, 32\)"):
        mha(torch.randn(17, 32))
    mha.backend = "cudnn"
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        mha(torch.randn(1, 17, 32))


def test_multi_head_attention_compiles_without_a_graph_break(device):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 2, num_kv_heads=1, causal=True).to(device)
    x = torch.randn(2, 17, 32).to(device).requires_grad_()
    y = torch.compile(mha, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, mha(x))
    y.sum().backward()
    assert x.grad.abs().sum() > 0
