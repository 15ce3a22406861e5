"""flashcourse.flash_attn_interface and the modules of flashcourse.nn against flash-attn 2.8's API:
signatures, layouts, return conventions, packed inputs, the modules, and the errors of bad options."""

import inspect

import pytest
import torch

import flashcourse
from flashcourse import (
    FlashCrossAttention,
    FlashSelfAttention,
    flash_attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from flash_reference import max_error, reference_attention, visible
from helpers import make_qkv

# flash-attn 2.8: flash_attn/flash_attn_interface.py and flash_attn/modules/mha.py
OPTIONS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
           ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    flash_attn_func: [("q", None), ("k", None), ("v", None), *OPTIONS],
    flash_attn_kvpacked_func: [("q", None), ("kv", None), *OPTIONS],
    flash_attn_qkvpacked_func: [("qkv", None), *OPTIONS],
    FlashSelfAttention.__init__: [("self", None), ("causal", False), ("softmax_scale", None),
                                  ("attention_dropout", 0.0), ("window_size", (-1, -1)), ("alibi_slopes", None),
                                  ("deterministic", False)],
    FlashSelfAttention.forward: [("self", None), ("qkv", None), ("causal", None), ("cu_seqlens", None),
                                 ("max_seqlen", None)],
    FlashCrossAttention.__init__: [("self", None), ("causal", False), ("softmax_scale", None),
                                   ("attention_dropout", 0.0), ("alibi_slopes", None), ("window_size", (-1, -1)),
                                   ("deterministic", False)],
    FlashCrossAttention.forward: [("self", None), ("q", None), ("kv", None), ("causal", None), ("cu_seqlens", None),
                                  ("max_seqlen", None), ("cu_seqlens_k", None), ("max_seqlen_k", None)],
}


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__qualname__)
def test_signatures_are_flash_attns(fn):
    params = inspect.signature(fn).parameters.values()
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == SIGNATURES[fn]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


def test_everything_is_exported():
    for name in ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "FlashSelfAttention",
                 "FlashCrossAttention", "FlashAttention", "flash_attention"):
        assert hasattr(flashcourse, name)
    from flashcourse.nn import flash_attn_func as from_nn  # the older import path still works
    assert from_nn is flash_attn_func


def bnhd(*tensors):
    return [t.transpose(1, 2).contiguous() for t in tensors]


def test_flash_attn_func_is_flash_attention_in_the_bnhd_layout(device):
    q, k, v = make_qkv(2, 4, 2, 33, 47, 32, dtype=torch.float16, seed=1, device=device)
    slopes = torch.rand(2, 4, device=device) * 0.2
    options = dict(causal=True, window_size=(9, 3), softcap=4.0, alibi_slopes=slopes)
    out = flash_attn_func(*bnhd(q, k, v), 0.0, 0.3, **options)
    assert out.shape == (2, 33, 4, 32) and out.is_contiguous() and out.dtype == torch.float16
    assert torch.equal(out, flash_attention(q, k, v, scale=0.3, **options).transpose(1, 2))


def test_return_attn_probs_conventions(device):
    """(out, softmax_lse, S_dmask): lse +inf for a row that sees no key (flashcourse keeps -inf),
    S_dmask empty without dropout, else (B, H, Nq, Nk) rounded up to multiples of 128, zero padded."""
    q, k, v = make_qkv(1, 2, 2, 40, 17, 16, dtype=torch.float16, seed=2, device=device)
    out, lse, S_dmask = flash_attn_func(*bnhd(q, k, v), causal=True, return_attn_probs=True)
    _, L = flash_attention(q, k, v, causal=True, return_lse=True)
    empty = ~visible(40, 17, causal=True, device=device).any(-1)
    assert (lse[:, :, empty] == float("inf")).all() and torch.equal(lse[:, :, ~empty], L[:, :, ~empty])
    assert (out[:, empty] == 0).all()
    assert S_dmask.shape == (0,) and S_dmask.dtype == torch.float16
    torch.manual_seed(0)
    out, lse, S_dmask = flash_attn_func(*bnhd(q, k, v), 0.2, causal=True, return_attn_probs=True)
    assert S_dmask.shape == (1, 2, 128, 128) and S_dmask.dtype == torch.float16
    assert (S_dmask[:, :, 40:] == 0).all() and (S_dmask[:, :, :, 17:] == 0).all()
    torch.manual_seed(0)
    _, _, P = flash_attention(q, k, v, causal=True, dropout_p=0.2, return_attn_probs=True)
    assert torch.equal(S_dmask[:, :, :40, :17], P)


def test_packed_functions_match_the_unpacked_one(device):
    qkv = torch.randn(2, 37, 3, 4, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = qkv[:, :, 1:].detach().clone().requires_grad_()
    q = qkv[:, :, 0].detach().clone().requires_grad_()
    options = dict(causal=True, window_size=(5, 0), alibi_slopes=torch.full((4,), 0.1, device=device))
    packed = flash_attn_qkvpacked_func(qkv, **options)
    half_packed = flash_attn_kvpacked_func(q, kv, **options)
    plain = flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], **options)
    assert torch.equal(packed, plain) and torch.equal(half_packed, plain)
    g = torch.randn_like(plain)
    (dqkv,) = torch.autograd.grad(packed, qkv, g)
    dq, dkv = torch.autograd.grad(half_packed, (q, kv), g)
    assert dqkv.shape == qkv.shape and dkv.shape == kv.shape
    assert torch.equal(dqkv[:, :, 0], dq) and torch.equal(dqkv[:, :, 1:], dkv)


def test_window_size_as_a_tensor_and_grouped_heads(device):
    """flash-attn's tests draw windows with torch.randint: a 2-element tensor works as a tuple."""
    torch.manual_seed(0)
    window = torch.randint(0, 30, (2,))
    q, k, v = make_qkv(1, 6, 2, 25, 30, 16, dtype=torch.float16, seed=3, device=device)
    out = flash_attn_func(*bnhd(q, k, v), window_size=window)
    want = reference_attention(q, k, v, window_size=tuple(window.tolist())).transpose(1, 2)
    assert max_error(out, want) < 2e-3


def test_deterministic_flag_and_backward_are_deterministic(device):
    q, k, v = (t.requires_grad_() for t in bnhd(*make_qkv(1, 4, 2, 45, 45, 16, dtype=torch.float16, seed=4,
                                                          device=device)))
    out = flash_attn_func(q, k, v, causal=True, deterministic=True)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_self_attention_module(device):
    """Dropout only in training mode, repeatable under torch.manual_seed; the slopes follow .to()."""
    qkv = torch.randn(2, 33, 3, 2, 16, dtype=torch.float16).to(device)
    module = FlashSelfAttention(causal=True, attention_dropout=0.3, window_size=(8, 0),
                                alibi_slopes=torch.tensor([0.1, 0.2])).to(device)
    assert module.alibi_slopes.device.type == torch.device(device).type
    expected = flash_attn_qkvpacked_func(qkv, causal=True, window_size=(8, 0), alibi_slopes=module.alibi_slopes)
    assert torch.equal(module.eval()(qkv), expected)
    module.train()
    torch.manual_seed(1)
    first = module(qkv)
    torch.manual_seed(1)
    assert torch.equal(module(qkv), first) and not torch.equal(first, expected)
    assert torch.equal(module.eval()(qkv, causal=False), flash_attn_qkvpacked_func(
        qkv, window_size=(8, 0), alibi_slopes=module.alibi_slopes))
    with pytest.raises(ValueError, match="passes cu_seqlens, max_seqlen together"):
        module(qkv, cu_seqlens=torch.tensor([0, 33], dtype=torch.int32))


def test_cross_attention_module(device):
    q = torch.randn(2, 20, 4, 16, dtype=torch.float16).to(device)
    kv = torch.randn(2, 31, 2, 2, 16, dtype=torch.float16).to(device)
    module = FlashCrossAttention(causal=True, softmax_scale=0.3).to(device).eval()
    assert torch.equal(module(q, kv), flash_attn_kvpacked_func(q, kv, softmax_scale=0.3, causal=True))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=5), ValueError, r"window_size must be \(left, right\)"),
    (dict(window_size=(3, -2)), ValueError, "its right size is -2"),
    (dict(window_size=(1.5, 2)), TypeError, "its left size is 1.5"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (dict(softcap="a"), TypeError, "softcap must be a number"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be a float32 tensor of shape \(H,\) = \(2,\)"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "convert it with .float()"),
    (dict(alibi_slopes=[0.1, 0.2]), TypeError, "alibi_slopes must be a float32 tensor"),
    (dict(deterministic="yes"), TypeError, "deterministic must be True or False"),
    (dict(causal=1), TypeError, "causal must be True or False"),
    (dict(return_attn_probs=None), TypeError, "return_attn_probs must be True or False"),
])
def test_bad_options_are_explained(kwargs, error, match, device):
    q, k, v = bnhd(*make_qkv(1, 2, 2, 8, 8, 16, dtype=torch.float16, device=device))
    with pytest.raises(error, match=match):
        flash_attn_func(q, k, v, **kwargs)


def test_bad_packing_is_explained():
    with pytest.raises(ValueError, match=r"kv must be a packed tensor of shape \(B, N, 2, H, d\).*kv.view"):
        flash_attn_kvpacked_func(torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 32))
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        flash_attn_qkvpacked_func([1, 2, 3])
