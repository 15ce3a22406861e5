"""The check before timing: a provider's output (and gradients) against float64 naive attention.

The reference is computed on a slice of the full inputs: batch 0, up to ``CHECK_HEADS`` heads, the
last ``CHECK_ROWS`` query rows. With bottom-right causal alignment those rows see exactly the keys
they see in the full problem, so even N = 131072 is checked cheaply. For gradients, dO is random on
the slice rows and zero elsewhere, so dq (slice rows), dk and dv (slice heads) can be compared too.
"""

import math
from typing import Dict, Tuple

import torch

from ..reference import naive_attention, naive_attention_backward

# largest ‖out − ref‖ / ‖ref‖ a provider may show. float32: 5e-3 holds for TF32 matrix products too,
# which the kernels and SDPA use when torch.get_float32_matmul_precision() is "high" or "medium".
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 5e-3, torch.float64: 1e-6}
CHECK_ROWS = 512
CHECK_HEADS = 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (inf when a has a NaN or inf)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class Reference:
    """Float64 naive attention on the check slice of one shape's inputs, kept on the CPU."""

    def __init__(self, q, k, v, causal: bool, seed: int = 0):
        B, H, N, d = q.shape
        r, h = min(N, CHECK_ROWS), min(H, CHECK_HEADS)
        self.rows = (slice(0, 1), slice(0, h), slice(N - r, N))  # where q, o, dq are compared
        self.heads = (slice(0, 1), slice(0, h))  # where k, v, dk, dv are compared
        self.causal = causal
        # dO of the slice, in q's dtype so that the provider sees exactly these values
        self.dO = torch.randn(1, h, r, d, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
        self.q = q[self.rows].to("cpu", torch.float64)
        self.k, self.v = (t[self.heads].to("cpu", torch.float64) for t in (k, v))
        self._o = self._grads = None

    @property
    def o(self) -> torch.Tensor:
        if self._o is None:
            self._o = naive_attention(self.q, self.k, self.v, causal=self.causal)
        return self._o

    @property
    def grads(self) -> tuple:
        """(dq of the slice rows, dk, dv of the slice heads) for dO = ``self.dO`` on the slice, 0 elsewhere."""
        if self._grads is None:
            dO = self.dO.to(torch.float64)
            self._grads = naive_attention_backward(self.q, self.k, self.v, self.o, dO, causal=self.causal)
        return self._grads


def errors(fn, q, k, v, ref: Reference, with_grad: bool) -> Dict[str, float]:
    """Run ``fn`` once on the full inputs; the relative error of its output (and dq, dk, dv) on the slice."""
    if not with_grad:
        with torch.no_grad():
            o = fn(q, k, v, ref.causal)
        return {"output": rel_err(o[ref.rows].cpu(), ref.o)}
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(qg, kg, vg, ref.causal)
    found = {"output": rel_err(o[ref.rows].detach().cpu(), ref.o)}
    dO = torch.zeros_like(o)
    dO[ref.rows] = ref.dO.to(dO.device)
    # a gradient that does not reach an input is zero (and its check fails)
    grads = torch.autograd.grad(o, (qg, kg, vg), dO, allow_unused=True)
    dq, dk, dv = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))
    got = (dq[ref.rows], dk[ref.heads], dv[ref.heads])
    found.update({name: rel_err(g.cpu(), want) for name, g, want in zip(("dq", "dk", "dv"), got, ref.grads)})
    return found


def verdict(found: Dict[str, float], tol: float) -> Tuple[str, str, float]:
    """(status, note, worst error): failed, naming the worst tensor, when an error is above ``tol``."""
    name, worst = max(found.items(), key=lambda item: item[1])
    if worst <= tol:
        return "ok", "", worst
    what = "NaN or inf" if math.isinf(worst) else f"relative error {worst:.2e} > {tol:.0e}"
    return "failed", f"wrong {name}: {what} against float64 naive attention", worst
