"""Chapter 08: splitting and merging heads, and the multi-head attention module.

The module is built in the worker with the grader's weights, and its ``self.attention`` is swapped
for an attention of another scale (``routed_scale()``, drawn per submission from [0.35, 0.65)) that
counts its calls: the output must be the one that attention gives, so a module that computes
attention some other way (e.g. with PyTorch's SDPA, which it may not call) loses. The oracle
(float64, here) uses the same weights and scale: multi-head attention as flashcourse.MultiHeadAttention
computes it.
"""

import math

import torch

from ..framework import ATTENTION, ChapterChecks, CheckFailed, expect, expect_close, randn, tolerance, uniform

CHECKS = ChapterChecks("ch08", file="ch08_module", notebook="08_transformer")
CHECKS.exercise("MultiHeadAttention.forward", forbid=ATTENTION,
                instead="the module computes its attention with self.attention(q, k, v, causal=self.causal), "
                        "which the grader swaps for its own")


def routed_scale() -> float:
    """The scale of the attention that replaces self.attention: no submission can know it in advance."""
    return round(uniform(0.35, 0.65, seed=11), 6)


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


def _attend(q, k, v, causal: bool, scale: float):
    """Attention with grouped heads, in plain torch (the swapped-in self.attention and the oracle)."""
    H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    S = scale * (q @ k.transpose(-2, -1))
    if causal:
        S = S.masked_fill(torch.arange(Nk) > torch.arange(Nq)[:, None] + (Nk - Nq), float("-inf"))
    return torch.softmax(S, dim=-1).nan_to_num(0.0) @ v


@CHECKS.driver
def mha(module, weights, x, g, *, E, H, Hkv, causal, scale):
    """Worker side: build the learner's module with the grader's weights, route self.attention, run it."""
    mine = module.MultiHeadAttention(E, H, num_kv_heads=Hkv, causal=causal).to(x.device)
    try:
        mine.load_state_dict(weights)
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:300]}
    calls = []

    def attention(q, k, v, *, causal=False, **_):
        calls.append(bool(causal))
        return _attend(q, k, v, causal, scale)

    mine.attention = attention
    x = x.clone().requires_grad_(g is not None)
    y = mine(x)
    out = {"y": y, "calls": calls}
    if g is not None and isinstance(y, torch.Tensor):
        (y * g).sum().backward()
        out.update(x_grad=x.grad, qkv_grad=mine.qkv_proj.weight.grad)
    return out


def _module_check(m, E, H, Hkv, causal, N=13, B=2, grads=False):
    case = f"B={B} N={N} E={E} H={H} Hkv={Hkv}" + (" causal" if causal else "")
    d = E // H
    weights = {"qkv_proj.weight": randn((H + 2 * Hkv) * d, E, seed=5, scale=1 / math.sqrt(E)),
               "out_proj.weight": randn(E, E, seed=6, scale=1 / math.sqrt(E))}
    x = randn(B, N, E, seed=3)
    g = randn(B, N, E, seed=4) if grads else None
    scale = routed_scale()
    got = m.run("mha", weights, x, g, E=E, H=H, Hkv=Hkv, causal=causal, scale=scale)
    expect(isinstance(got, dict), f"the module could not be run [{case}]")
    expect("error" not in got, f"the module's parameters must stay qkv_proj and out_proj as given: {got.get('error')}")
    calls = got.get("calls")
    routed = f"the grader swaps self.attention for an attention of scale {scale}"
    expect(calls != [], f"forward never called self.attention [{case}]",
           f"compute the attention with self.attention(q, k, v, causal=self.causal) ({routed})")
    expect(isinstance(calls, list) and len(calls) == 1,
           f"forward called self.attention {len(calls) if isinstance(calls, list) else '?'} times [{case}]",
           "one call of self.attention with all the heads at once")
    expect(calls[0] == causal, f"forward passed causal={calls[0]} to self.attention, expected causal={causal} [{case}]",
           "pass causal=self.causal to self.attention")
    # the oracle, in float64 with the same weights and the routed scale
    W, Wo = (w.double().requires_grad_(grads) for w in weights.values())
    X = x.double().requires_grad_(grads)
    q, k, v = (X @ W.T).split([H * d, Hkv * d, Hkv * d], dim=-1)
    heads = lambda t, n: t.view(B, N, n, d).transpose(1, 2)  # noqa: E731
    O = _attend(heads(q, H), heads(k, Hkv), heads(v, Hkv), causal, scale)
    want = O.transpose(1, 2).reshape(B, N, E) @ Wo.T
    tol = tolerance(torch.float32)
    y = got.get("y")
    if isinstance(y, torch.Tensor) and y.shape == want.shape and not torch.allclose(y.double(), want, **tol):
        # a module that ignores self.attention matches the usual scale instead: say so
        usual = _attend(heads(q, H), heads(k, Hkv), heads(v, Hkv), causal, 1 / math.sqrt(d))
        if torch.allclose(y.double(), usual.transpose(1, 2).reshape(B, N, E) @ Wo.T, **tol):
            raise CheckFailed(f"y = module(x) does not use self.attention's result [{case}]",
                              f"return out_proj(merge_heads(self.attention(...))) ({routed})")
    expect_close("y = module(x) vs the float64 reference", y, want.detach(), case=case, dtype=x.dtype, **tol)
    if grads:
        (want * g.double()).sum().backward()
        expect_close("x.grad vs the float64 reference", got.get("x_grad"), X.grad, case=case, **tol)
        expect_close("qkv_proj.weight.grad vs the float64 reference", got.get("qkv_grad"), W.grad,
                     case=case, **tol)


@CHECKS.add("MultiHeadAttention.forward", "one kv head per query head, not causal", points=2,
            hint="split [Q | K | V] along the last dim, split_heads each, self.attention, merge_heads, out_proj")
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
