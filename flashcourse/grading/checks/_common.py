"""Cases and oracles the attention chapters share."""

import torch
from torch.overrides import TorchFunctionMode

import flashcourse as fc

from ..framework import case_name, expect, expect_close, qkv, randn, tolerance

# (B, H, Nq, Nk, d): a single query, lengths that are not multiples of any block, Nq != Nk both ways
SHAPES = [(1, 1, 1, 1, 8), (2, 3, 17, 17, 16), (1, 2, 37, 70, 32), (1, 2, 45, 20, 16)]


def oracle(q, k, v, causal: bool, scale=None):
    """(O, L) of flashcourse.naive_attention in float64: the ground truth."""
    return fc.naive_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, return_lse=True)


def attention_cases(*, causal_options=(False, True), dtypes=(torch.float32,), shapes=SHAPES, seed=0, on="cpu"):
    """Yield (case name, q, k, v, causal) over shapes × causal × dtypes, tensors on the device ``on``."""
    for n, (B, H, Nq, Nk, d) in enumerate(shapes):
        for causal in causal_options:
            for dtype in dtypes:
                q, k, v = (t.to(on) for t in qkv(B, H, Nq, Nk, d, seed=seed + 10 * n, dtype=dtype))
                yield case_name(B=B, H=H, Nq=Nq, Nk=Nk, d=d, dtype=dtype, causal=causal), q, k, v, causal


def expect_output(what: str, got, want, dtype, case: str, kernel: bool = False) -> None:
    """got is O (B, H, Nq, d) in the inputs' dtype and close to the float64 oracle."""
    expect_close(what, got, want, case=case, dtype=dtype, **tolerance(dtype, kernel))


def expect_lse(what: str, got, want, dtype, case: str, kernel: bool = False) -> None:
    """got is L (B, H, Nq) in float32 (float64 for float64 inputs) and close to the float64 oracle."""
    expect_close(what, got, want, case=case, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                 **tolerance(torch.float32, kernel))


def device() -> str:
    """Where Triton kernels run: the GPU when there is one, else the CPU (in Triton's interpreter)."""
    return "cuda" if fc.HAS_CUDA else "cpu"


def backward_case(q, k, v, causal: bool, scale=None, seed: int = 99):
    """(o, lse, do, (dq, dk, dv)): the forward results in the inputs' dtype (lse float32), a random dO,
    and the float64 gradients of flashcourse.naive_attention_backward."""
    O, L = oracle(q, k, v, causal, scale)
    do = randn(*q.shape, seed=seed, dtype=q.dtype).to(q.device)
    grads = fc.naive_attention_backward(q.double(), k.double(), v.double(), O, do.double(), causal=causal, scale=scale)
    return O.to(q.dtype), L.float(), do, grads


def expect_grads(what: str, got, want, inputs, case: str, kernel: bool = False) -> None:
    """got = (dq, dk, dv) shaped and typed like (q, k, v) and close to the float64 gradients."""
    expect(isinstance(got, tuple) and len(got) == 3,
           f"{what} must return a tuple (dq, dk, dv), got {type(got).__name__} [{case}]")
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, inputs):
        expect_close(f"{name} vs flashcourse.naive_attention_backward", g, w, case=case, dtype=x.dtype,
                     **tolerance(x.dtype, kernel))


def check_forward(forward, what: str, *, output=True, lse=False, blocks=None, kernel=False, **cases) -> None:
    """forward(q, k, v, causal=..., **blocks) must return (O, L) close to the float64 oracle on every case."""
    blocks = blocks or {}
    for case, q, k, v, causal in attention_cases(on=device() if kernel else "cpu", **cases):
        case += "".join(f" {name}={b}" for name, b in blocks.items())
        out = forward(q, k, v, causal=causal, **blocks)
        expect(isinstance(out, tuple) and len(out) == 2, f"{what} must return a tuple (O, L), got {type(out).__name__} [{case}]")
        want_O, want_L = oracle(q, k, v, causal)
        if output:
            expect_output("O vs flashcourse", out[0], want_O, q.dtype, case, kernel)
        if lse:
            expect_lse("L vs flashcourse", out[1], want_L, q.dtype, case, kernel)


class Watch(TorchFunctionMode):
    """Records the name of the first torch operation for which ``flag(name, args, out)`` is true."""

    def __init__(self, flag):
        super().__init__()
        self.flag, self.culprit = flag, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if self.culprit is None and self.flag(name, args, out):
            self.culprit = name
        return out


def expect_tiled(what: str, call, Nq: int, Nk: int) -> None:
    """call() must never build a tensor ending in (Nq, Nk): tiles of B_r × B_c scores only."""
    whole = lambda name, args, out: isinstance(out, torch.Tensor) and tuple(out.shape[-2:]) == (Nq, Nk)  # noqa: E731
    with Watch(whole) as watch:
        call()
    expect(watch.culprit is None, f"{what} built a whole (Nq, Nk) = ({Nq}, {Nk}) matrix (in torch.{watch.culprit}); "
                                  f"work on one (block_m, block_n) tile of scores at a time")
