"""Cases, oracles and comparisons that the attention chapters share (all of it runs in the grader)."""

import torch

import flashcourse as fc

from ..framework import CheckFailed, case_name, expect, expect_close, qkv, randn, tolerance

# (B, H, Nq, Nk, d): a single query, lengths that are not multiples of any block, Nq != Nk both ways
SHAPES = [(1, 1, 1, 1, 8), (2, 3, 17, 17, 16), (1, 2, 37, 70, 32), (1, 2, 45, 20, 16)]
# large logits: q, k ~ N(0, 3²), d = 128, so scale · q·k has a standard deviation of 9 (|S| up to ~40),
# over 1024 keys (rows sums of 1024 terms); the interpreted kernels get one block of 64 queries
# (KEYS), and dK, dV, which sum over the queries, 1024 queries and one block of 64 keys (QUERIES)
SQUARE, KEYS, QUERIES = (1, 1, 1024, 1024, 128), (1, 1, 64, 1024, 128), (1, 1, 1024, 64, 128)
EXPLICIT_SCALE = 0.3
SCALE_HINT = "use the scale argument when it is given, and only then 1/sqrt(d); apply it once"


def oracle(q, k, v, causal: bool, scale=None, **options):
    """(O, L) of flashcourse.naive_attention in float64: the ground truth (options: its window_size, ...)."""
    return fc.naive_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, return_lse=True, **options)


def device() -> str:
    """Where Triton kernels run: the GPU when there is one, else the CPU (in Triton's interpreter)."""
    return "cuda" if fc.HAS_CUDA else "cpu"


def kernel_dtypes() -> tuple:
    """The dtypes a kernel exercise is graded in: bfloat16 only on a GPU (see require_kernel_dtype)."""
    return (torch.float32, torch.float16) + ((torch.bfloat16,) if device() == "cuda" else ())


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (the last two dims swapped in memory)."""
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


def attention_cases(*, causal_options=(False, True), dtypes=(torch.float32,), shapes=SHAPES, seed=0, on="cpu",
                    std: float = 1.0):
    """Yield (case name, q, k, v, causal) over shapes × causal × dtypes, tensors on the device ``on``."""
    for n, (B, H, Nq, Nk, d) in enumerate(shapes):
        for causal in causal_options:
            for dtype in dtypes:
                q, k, v = (t.to(on) for t in qkv(B, H, Nq, Nk, d, seed=seed + 10 * n, dtype=dtype, scale=std))
                name = case_name(B=B, H=H, Nq=Nq, Nk=Nk, d=d, dtype=dtype, causal=causal)
                yield name + (f" q,k~N(0,{std:g}²)" if std != 1.0 else ""), q, k, v, causal


def large_logit_cases(shape=SQUARE, dtypes=(torch.float16,), on="cpu", causal_options=(False,)):
    """Large-logit cases: 1024 keys (or queries), d = 128, |scale · q·k| up to ~40."""
    return attention_cases(shapes=[shape], std=3.0, dtypes=dtypes, on=on, causal_options=causal_options, seed=7)


def expect_output(what: str, got, want, dtype, case: str, kernel: bool = False) -> None:
    """got is O (B, H, Nq, d) in the inputs' dtype and close to the float64 oracle."""
    expect_close(what, got, want, case=case, dtype=dtype, **tolerance(dtype, kernel),
                 dtype_hint=f"return O in the inputs' dtype {dtype}: compute in float32, then .to(q.dtype)")


def expect_lse(what: str, got, want, dtype, case: str, kernel: bool = False) -> None:
    """got is L (B, H, Nq) in float32 (float64 for float64 inputs) and close to the float64 oracle."""
    expect_close(what, got, want, case=case, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                 dtype_hint="return L in float32, whatever the inputs' dtype", **tolerance(torch.float32, kernel))


def check_forward(fn, what: str, *, output=True, lse=False, blocks=None, kernel=False, scale=None, cases=None,
                  **case_options) -> None:
    """fn(q, k, v, causal=..., [scale=...], **blocks) must return (O, L) close to the float64 oracle."""
    blocks = blocks or {}
    extra = {**({} if scale is None else {"scale": scale}), **blocks}
    cases = cases if cases is not None else attention_cases(on=device() if kernel else "cpu", **case_options)
    for case, q, k, v, causal in cases:
        case += "".join(f" {name}={b}" for name, b in extra.items())
        out = fn(q, k, v, causal=causal, **extra)
        expect(isinstance(out, tuple) and len(out) == 2,
               f"{what} must return a tuple (O, L), got {type(out).__name__} [{case}]", "return O, L")
        want_O, want_L = oracle(q, k, v, causal, scale)
        if output:
            expect_output("O vs flashcourse", out[0], want_O, q.dtype, case, kernel)
        if lse:
            expect_lse("L vs flashcourse", out[1], want_L, q.dtype, case, kernel)


def backward_case(q, k, v, causal: bool, scale=None, seed: int = 99):
    """(o, lse, do, (dq, dk, dv)): the forward results in the inputs' dtype (lse float32), a random dO,
    and the float64 gradients of flashcourse.naive_attention_backward at the o that the learner gets."""
    O, L = oracle(q, k, v, causal, scale)
    o = O.to(q.dtype)
    do = randn(*q.shape, seed=seed, dtype=q.dtype).to(q.device)
    grads = fc.naive_attention_backward(q.double(), k.double(), v.double(), o.double(), do.double(),
                                        causal=causal, scale=scale)
    return o, L.float(), do, grads


def exact_grads(q, k, v, do, causal: bool, scale=None):
    """The float64 gradients at the exact O (not at O rounded to the inputs' dtype): those of a backward
    pass that takes D = rowsum(P ∘ dP) instead of rowsum(dO ∘ O), the same number before rounding."""
    O, _ = oracle(q, k, v, causal, scale)
    return fc.naive_attention_backward(q.double(), k.double(), v.double(), O, do.double(), causal=causal, scale=scale)


def expect_grads(what: str, got, want, inputs, case: str, kernel: bool = False, exact=None) -> None:
    """got = (dq, dk, dv) shaped and typed like (q, k, v) and close to the float64 gradients ``want``, or to
    ``exact()`` when given (D from P and dP: both are the formulas of the backward pass)."""
    expect(isinstance(got, tuple) and len(got) == 3,
           f"{what} must return a tuple (dq, dk, dv), got {type(got).__name__} [{case}]", "return dq, dk, dv")

    def compare(reference):
        for name, g, w, x in zip(("dq", "dk", "dv"), got, reference, inputs):
            expect_close(f"{name} vs flashcourse.naive_attention_backward", g, w, case=case, dtype=x.dtype,
                         dtype_hint=f"return {name} like {name[1:]}: in {x.dtype} (compute in float32, then .to({name[1:]}.dtype))",
                         **tolerance(x.dtype, kernel))

    try:
        compare(want)
    except CheckFailed:
        if exact is None or not all(isinstance(g, torch.Tensor) for g in got):
            raise
        try:
            compare(exact())
        except CheckFailed:
            pass
        else:
            return
        raise


# the structure checks: sizes where Nq, Nk, B_r, B_c, d (and H) all differ
TILED = {"B": 1, "H": 2, "Nq": 70, "Nk": 45, "d": 16, "block_m": 12, "block_n": 7}
# what the rows of each input are indexed by, in the order (q, k, v, o, lse, do) of the calls
ROLES = ["Q", "K", "K", "Q", None, "Q"]


def expect_tiles(what: str, observed: dict) -> None:
    """The ``tiles`` probe saw no score-shaped tensor beyond one block_m × block_n tile."""
    v = observed.get("violation")
    if not v:
        return
    Nq, Nk, B_r, B_c = TILED["Nq"], TILED["Nk"], TILED["block_m"], TILED["block_n"]
    sizes = f"Nq={Nq} Nk={Nk} block_m={B_r} block_n={B_c}"
    if v.get("whole"):
        raise CheckFailed(f"{what} built a {tuple(v.get('shape', ()))} tensor, the size of the whole score matrix "
                          f"(in torch.{v.get('op')}) [{sizes}]",
                          "compute S_ij = scale · Q_i K_jᵀ (and its mask) inside the two loops, one tile at a time")
    q, k = v.get("queries"), v.get("keys")
    layout = "(keys × queries)" if v.get("transposed") else "(queries × keys)"
    swapped = q == B_c and k == B_r
    raise CheckFailed(f"{what} built a score tensor of {q} queries × {k} keys {layout} in torch.{v.get('op')}, "
                      f"larger than one block_m × block_n = {B_r} × {B_c} tile [{sizes}]",
                      "block_m (B_r) cuts the queries and block_n (B_c) the keys: swap them back" if swapped else
                      "loop over key blocks too: one (block_m, block_n) tile of scores at a time, never a strip")
