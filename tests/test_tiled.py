"""tiled_attention (chapters 03 and 06) against float64 naive attention and autograd.

Every test runs on the ``device`` fixture; float32 is IEEE there (precision "highest", see conftest.py).
"""

import pytest
import torch

from flashcourse import naive_attention, tiled_attention, tiled_attention_backward, tiled_attention_forward
from helpers import make_qkv, rel_err, sdpa_reference

GRID = [  # (Nq, Nk, H, Hkv, d)
    (1, 1, 2, 2, 16), (17, 17, 2, 1, 40), (64, 64, 2, 2, 64), (129, 129, 4, 2, 16),
    (1000, 1000, 1, 1, 16), (17, 129, 2, 2, 128), (129, 17, 2, 1, 40), (1, 300, 2, 2, 16),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,H,Hkv,d", GRID)
def test_forward_matches_naive(Nq, Nk, H, Hkv, d, causal, device):
    q, k, v = make_qkv(B=1, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d, device=device)
    O, L = tiled_attention(q, k, v, causal=causal, return_lse=True, block_m=32, block_n=16)
    O_ref, L_ref = naive_attention(q, k, v, causal=causal, return_lse=True)
    assert rel_err(O, O_ref) < 1e-12 and rel_err(O, sdpa_reference(q, k, v, causal)) < 1e-12
    assert torch.equal(torch.isneginf(L), torch.isneginf(L_ref))
    assert torch.allclose(L[torch.isfinite(L)], L_ref[torch.isfinite(L_ref)], atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,H,Hkv,d", GRID[:4] + GRID[5:])
def test_gradients_match_autograd_on_naive(Nq, Nk, H, Hkv, d, causal, device):
    q, k, v = (t.requires_grad_() for t in make_qkv(B=2, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d, device=device))
    do = torch.randn(2, H, Nq, d, dtype=torch.float64).to(device)
    got = torch.autograd.grad(tiled_attention(q, k, v, causal=causal, block_m=16, block_n=32), (q, k, v), do)
    want = torch.autograd.grad(naive_attention(q, k, v, causal=causal), (q, k, v), do)
    for name, g, w in zip("qkv", got, want):
        assert torch.allclose(g, w, atol=1e-10), f"d{name}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_low_precision_and_large_logits(dtype, tol, device):
    q, k, v = make_qkv(Nq=100, Nk=129, d=64, dtype=dtype, scale_logits=100.0, device=device)
    O, L = tiled_attention(q, k, v, causal=True, return_lse=True)
    assert O.dtype == dtype and L.dtype == torch.float32
    assert torch.isfinite(O).all() and torch.isfinite(L).all()
    assert rel_err(O, sdpa_reference(q, k, v, True)) < tol


def test_block_size_does_not_change_the_result(device):
    q, k, v = make_qkv(Nq=50, Nk=70, d=16, device=device)
    outs = [tiled_attention_forward(q, k, v, causal=True, block_m=bm, block_n=bn)[0] for bm, bn in [(1, 1), (7, 13), (128, 128)]]
    assert all(torch.allclose(o, outs[0], atol=1e-13) for o in outs)


def test_causal_skipping_visits_fewer_tiles(monkeypatch):
    import flashcourse.tiled as tiled

    calls = []
    real = tiled._tile_scores
    monkeypatch.setattr(tiled, "_tile_scores", lambda *a: calls.append(a[2:4]) or real(*a))
    q, k, v = make_qkv(Nq=64, d=16)
    tiled_attention_forward(q, k, v, causal=True, block_m=16, block_n=16)
    assert len(calls) == 10  # 4 query blocks see 1 + 2 + 3 + 4 key blocks, not 16
    calls.clear()
    tiled_attention_backward(q, k, v, *naive_attention(q, k, v, causal=True, return_lse=True), q, causal=True,
                             block_m=16, block_n=16)
    assert len(calls) == 10


def test_non_contiguous_inputs(device):
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in make_qkv(Nq=33, Nk=20, d=16, device=device))
    O = tiled_attention(q, k, v, causal=True, block_m=8, block_n=8)
    assert rel_err(O, naive_attention(q, k, v, causal=True)) < 1e-12
    O.sum().backward()
    assert q.grad.shape == q.shape
