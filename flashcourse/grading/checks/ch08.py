"""Chapter 08: splitting and merging heads, and the multi-head attention module, against
flashcourse.MultiHeadAttention (naive backend, float64) with the same weights."""

import torch

import flashcourse as fc

from ..framework import ChapterChecks, CheckFailed, expect, expect_close, randn, tolerance
from ._common import device

CHECKS = ChapterChecks("ch08")


@CHECKS.add("split_heads", "(B, N, H·d) -> (B, H, N, d)", hint="x.view(B, N, H, d).transpose(1, 2)")
def _(m):
    x = randn(2, 7, 12, seed=1)
    for H in (1, 3, 4):
        want = x.view(2, 7, H, 12 // H).permute(0, 2, 1, 3)
        expect_close("split_heads(x, H)", m.split_heads(x, H), want, atol=0, case=f"x (2, 7, 12), H={H}", dtype=x.dtype)


@CHECKS.add("merge_heads", "(B, H, N, d) -> (B, N, H·d)", hint="o.transpose(1, 2).reshape(B, N, H * d)")
def _(m):
    o = randn(2, 3, 7, 4, seed=2)
    expect_close("merge_heads(o)", m.merge_heads(o), o.permute(0, 2, 1, 3).reshape(2, 7, 12), atol=0,
                 case="o (2, 3, 7, 4)", dtype=o.dtype)


def _module_check(m, E, H, Hkv, causal, N=13, B=2, grads=False):
    case = f"B={B} N={N} E={E} H={H} Hkv={Hkv}" + (" causal" if causal else "")
    torch.manual_seed(0)
    mine = m.MultiHeadAttention(E, H, num_kv_heads=Hkv, causal=causal).to(device())
    ref = fc.MultiHeadAttention(E, H, num_kv_heads=Hkv, causal=causal, backend="naive").double()
    try:
        ref.load_state_dict({name: p.detach().double().cpu() for name, p in mine.state_dict().items()})
    except RuntimeError as e:
        raise CheckFailed(f"the module's parameters must stay qkv_proj and out_proj as given: {e}") from None
    x = randn(B, N, E, seed=3).to(device()).requires_grad_(grads)
    x_ref = x.detach().double().cpu().requires_grad_(grads)
    y, want = mine(x), ref(x_ref)
    expect(isinstance(y, torch.Tensor), f"forward must return a tensor (B, N, E), got {type(y).__name__} [{case}]")
    tol = tolerance(torch.float32, kernel=True)
    expect_close("y = module(x) vs flashcourse.MultiHeadAttention", y, want, case=case, dtype=x.dtype, **tol)
    if grads:
        g = randn(B, N, E, seed=4)
        (y * g.to(y.device)).sum().backward()
        (want * g.double()).sum().backward()
        expect_close("x.grad vs flashcourse.MultiHeadAttention", x.grad, x_ref.grad, case=case, **tol)
        expect_close("qkv_proj.weight.grad vs flashcourse.MultiHeadAttention", mine.qkv_proj.weight.grad,
                     ref.qkv_proj.weight.grad, case=case, **tol)


@CHECKS.add("MultiHeadAttention.forward", "one kv head per query head, not causal", points=2,
            hint="split [Q | K | V] along the last dim, split_heads each, attend, merge_heads, out_proj")
def _(m):
    _module_check(m, 32, 4, 4, False)


@CHECKS.add("MultiHeadAttention.forward", "causal", hint="pass causal=self.causal to self.attention")
def _(m):
    _module_check(m, 32, 2, 2, True, N=9)


@CHECKS.add("MultiHeadAttention.forward", "grouped kv heads (H = 4, Hkv = 2)",
            hint="K and V have num_kv_heads heads: split [H·d, Hkv·d, Hkv·d] and split_heads(k, Hkv)")
def _(m):
    _module_check(m, 32, 4, 2, True)


@CHECKS.add("MultiHeadAttention.forward", "gradients flow to x and the weights", points=2,
            hint="stay with differentiable torch operations (no .detach(), no .data, no torch.no_grad)")
def _(m):
    _module_check(m, 32, 4, 2, True, N=11, grads=True)
