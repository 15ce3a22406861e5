"""naive_attention and naive_attention_backward against float64 math and PyTorch SDPA (chapters 01, 06).

Every test runs on the ``device`` fixture; float32 is IEEE there (precision "highest", see conftest.py).
"""

import math

import pytest
import torch

from flashcourse import naive_attention, naive_attention_backward
from helpers import make_qkv, rel_err, sdpa_reference

SHAPES = [  # (Nq, Nk)
    (1, 1), (17, 17), (64, 64), (129, 129), (1000, 1000), (17, 129), (129, 17), (1, 64), (64, 1),
]


def loop_attention(q, k, v, causal):
    """Attention one query row at a time in Python float64, straight from the definition."""
    B, H, Nq, d = q.shape
    Nk, group = k.shape[2], q.shape[1] // k.shape[1]
    out = torch.zeros(B, H, Nq, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                keys = [j for j in range(Nk) if not causal or j <= i + Nk - Nq]
                if not keys:
                    continue
                s = [float(q[b, h, i].double() @ k[b, h // group, j].double()) / math.sqrt(d) for j in keys]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj / sum(w) * v[b, h // group, j].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(5, 5), (3, 7), (7, 3)])
def test_matches_the_definition(Nq, Nk, causal, device):
    q, k, v = make_qkv(B=1, H=2, Hkv=1, Nq=Nq, Nk=Nk, d=8)
    O = naive_attention(*(t.to(device) for t in (q, k, v)), causal=causal)
    assert torch.allclose(O.cpu(), loop_attention(q, k, v, causal), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", SHAPES)
@pytest.mark.parametrize("d", [16, 40, 64, 128])
def test_matches_sdpa_float64(Nq, Nk, d, causal, device):
    q, k, v = make_qkv(B=1, H=2, Nq=Nq, Nk=Nk, d=d, device=device)
    assert rel_err(naive_attention(q, k, v, causal=causal), sdpa_reference(q, k, v, causal)) < 1e-12


@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads(H, Hkv, causal, device):
    q, k, v = make_qkv(H=H, Hkv=Hkv, Nq=17, Nk=33, d=16, device=device)
    assert rel_err(naive_attention(q, k, v, causal=causal), sdpa_reference(q, k, v, causal)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs(dtype, tol, device):
    q, k, v = make_qkv(Nq=129, Nk=64, d=64, dtype=dtype, device=device)
    o, lse = naive_attention(q, k, v, causal=True, return_lse=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(o, sdpa_reference(q, k, v, causal=True)) < tol


def test_lse_is_logsumexp_of_scaled_scores(device):
    q, k, v = make_qkv(Nq=17, Nk=29, d=16, device=device)
    _, lse = naive_attention(q, k, v, scale=0.3, return_lse=True)
    assert lse.dtype == torch.float64
    assert torch.allclose(lse, torch.logsumexp(0.3 * q @ k.transpose(-2, -1), dim=-1))


def test_rows_that_see_no_key_give_zero_and_minus_inf(device):
    q, k, v = make_qkv(Nq=10, Nk=4, d=8, device=device)  # bottom-right causal: the first 6 queries see no key
    o, lse = naive_attention(q, k, v, causal=True, return_lse=True)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o[:, :, :6] == 0).all() and torch.isneginf(lse[:, :, :6]).all()
    assert torch.isfinite(lse[:, :, 6:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_stay_finite(dtype, device):
    q, k, v = make_qkv(Nq=64, d=64, dtype=dtype, scale_logits=100.0, device=device)
    o, lse = naive_attention(q, k, v, return_lse=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert rel_err(o, sdpa_reference(q, k, v)) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_non_contiguous_inputs(device):
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(Nq=17, Nk=23, d=16, device=device))
    assert not q.is_contiguous()
    assert rel_err(naive_attention(q, k, v, causal=True), sdpa_reference(q, k, v, True)) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,H,Hkv", [(17, 17, 2, 2), (9, 30, 4, 2), (30, 9, 4, 1), (1, 1, 2, 1)])
def test_backward_matches_autograd(Nq, Nk, H, Hkv, causal, device):
    q, k, v = (t.requires_grad_() for t in make_qkv(H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=16, device=device))
    o = naive_attention(q, k, v, causal=causal, scale=0.7)
    do = torch.randn_like(o)
    expected = torch.autograd.grad(o, (q, k, v), do)
    got = naive_attention_backward(q.detach(), k.detach(), v.detach(), o.detach(), do, causal=causal, scale=0.7)
    for name, g, e in zip("qkv", got, expected):
        assert g.shape == e.shape, name
        assert torch.allclose(g, e, atol=1e-12), f"d{name}"


# flash-attn's score options: each against a second computation (SDPA with an explicit mask or bias,
# or the formula written inline), in float64


@pytest.mark.parametrize("Nq, Nk", [(17, 33), (33, 17), (1, 9)])
@pytest.mark.parametrize("window, causal", [((3, 2), False), ((5, -1), True), ((-1, 0), False), ((0, 0), False)])
def test_window_matches_sdpa_with_the_mask(Nq, Nk, window, causal, device):
    import torch.nn.functional as F

    from flashcourse._checks import window_mask

    q, k, v = make_qkv(B=2, H=2, Nq=Nq, Nk=Nk, d=8, device=device)
    mask = window_mask(Nq, Nk, window, causal=causal, device=device)
    # SDPA gives NaN for a row with no visible key, the package 0
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    got = naive_attention(q, k, v, window_size=window, causal=causal)
    assert rel_err(got, want) < 1e-12
    assert (got[..., ~mask.any(-1), :] == 0).all()


def test_alibi_matches_sdpa_with_the_bias(device):
    import torch.nn.functional as F

    q, k, v = make_qkv(B=2, H=4, Hkv=2, Nq=9, Nk=20, d=8, device=device)
    slopes = torch.rand(2, 4, device=device)
    i, j = torch.arange(9, device=device)[:, None] + 11, torch.arange(20, device=device)[None, :]
    bias = -slopes.double()[:, :, None, None] * (i - j).abs()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    assert rel_err(naive_attention(q, k, v, alibi_slopes=slopes), want) < 1e-12
    # (H,) slopes are the same for every batch entry
    same = slopes[:1].expand(2, 4).contiguous()
    assert rel_err(naive_attention(q, k, v, alibi_slopes=slopes[0]), naive_attention(q, k, v, alibi_slopes=same)) == 0


def test_softcap_and_dropout_follow_their_formulas(device):
    q, k, v = make_qkv(B=1, H=2, Nq=7, Nk=11, d=8, device=device, scale_logits=10.0)
    cap, p = 3.0, 0.25
    keep = torch.rand(1, 2, 7, 11, generator=torch.Generator().manual_seed(1)).to(device) >= p
    s = cap * torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(8) / cap)
    want = (torch.softmax(s, -1) * keep / (1 - p)) @ v
    got = naive_attention(q, k, v, softcap=cap, dropout_p=p, dropout_mask=keep)
    assert rel_err(got, want) < 1e-12
    with pytest.raises(ValueError, match="dropout_mask"):
        naive_attention(q, k, v, dropout_p=p)


def test_upcast_false_computes_in_the_low_precision(device):
    q, k, v = make_qkv(B=1, H=2, Nq=64, Nk=64, d=32, dtype=torch.float16, device=device, scale_logits=3.0)
    ref = naive_attention(q.double(), k.double(), v.double())
    high, low = naive_attention(q, k, v), naive_attention(q, k, v, upcast=False)
    assert low.dtype == high.dtype == torch.float16
    # both round to float16 at the end; computing in float16 adds the error of every step on top
    assert rel_err(high, ref) < rel_err(low, ref) < 1e-2
