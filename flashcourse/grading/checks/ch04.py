"""Chapter 04: vector add, row softmax and a tiled matmul in Triton, against torch."""

import torch

from ..framework import ChapterChecks, case_name, expect_close, randn, tolerance
from ._common import device

CHECKS = ChapterChecks("ch04")


def _t(*shape, seed, dtype=torch.float32, scale=1.0):
    return randn(*shape, seed=seed, dtype=dtype, scale=scale).to(device())


@CHECKS.add("add_kernel", "n a multiple of BLOCK", hint="offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
def _(m):
    for n in (64, 256):
        x, y = _t(n, seed=n), _t(n, seed=n + 1)
        expect_close("add(x, y) vs x + y", m.add(x, y), x + y, atol=0, case=f"n={n} BLOCK=64", dtype=x.dtype)


@CHECKS.add("add_kernel", "n not a multiple of BLOCK", points=2,
            hint="mask = offs < n, passed to both tl.load and tl.store: the last program runs past n")
def _(m):
    for n, block in ((1, 64), (100, 64), (1000, 128), (77, 16)):
        x, y = _t(n, seed=n), _t(n, seed=n + 1)
        expect_close("add(x, y) vs x + y", m.add(x, y, BLOCK=block), x + y, atol=0, case=f"n={n} BLOCK={block}",
                     dtype=x.dtype)


def _softmax_check(m, shapes, dtype=torch.float32, scale=1.0):
    for n, (M, N) in enumerate(shapes):
        x = _t(M, N, seed=n, dtype=dtype, scale=scale)
        case = case_name(M=M, N=N, dtype=dtype, logits=scale)
        expect_close("softmax(x) vs torch.softmax(x, dim=-1)", m.softmax(x), torch.softmax(x.double(), dim=-1),
                     case=case, dtype=dtype, **tolerance(dtype))


@CHECKS.add("softmax_kernel", "rows of 16 and 64",
            hint="one program per row: row = tl.program_id(0); reduce with tl.max and tl.sum over axis 0")
def _(m):
    _softmax_check(m, [(4, 16), (3, 64)])


@CHECKS.add("softmax_kernel", "rows not a power of two", points=2,
            hint="load the padded columns with other=float('-inf') so that they add exp(−inf) = 0 to the sum")
def _(m):
    _softmax_check(m, [(5, 1), (3, 37), (2, 100)])


@CHECKS.add("softmax_kernel", "large logits and float16",
            hint="subtract the row max; compute in float32 and store in out's dtype")
def _(m):
    _softmax_check(m, [(3, 37)], scale=1000.0)
    _softmax_check(m, [(3, 37)], dtype=torch.float16, scale=3.0)


def _matmul_check(m, shapes, dtype=torch.float32, transpose_b=False):
    for n, (M, K, N) in enumerate(shapes):
        a = _t(M, K, seed=n, dtype=dtype)
        b = _t(N, K, seed=n + 1, dtype=dtype).t() if transpose_b else _t(K, N, seed=n + 1, dtype=dtype)
        want = a.double() @ b.double()
        case = case_name(M=M, K=K, N=N, dtype=dtype) + (" b=transposed view" if transpose_b else "")
        # float32 dots may run as TF32 on a GPU: a tolerance that still catches any real bug
        expect_close("matmul(a, b) vs a @ b", m.matmul(a, b), want, atol=2e-2, rtol=1e-2, case=case, dtype=dtype)


@CHECKS.add("matmul_kernel", "sizes multiples of the blocks", points=2,
            hint="acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32); for k0 in range(0, K, BLOCK_K): acc = tl.dot(a, b, acc)")
def _(m):
    _matmul_check(m, [(16, 16, 16), (32, 48, 16)])


@CHECKS.add("matmul_kernel", "ragged M, N, K", points=2,
            hint="mask each load on both dims with other=0.0, and the store on (M, N)")
def _(m):
    _matmul_check(m, [(1, 5, 7), (37, 20, 33)])


@CHECKS.add("matmul_kernel", "strided b and float16",
            hint="address B with both strides: b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn")
def _(m):
    _matmul_check(m, [(20, 24, 18)], transpose_b=True)
    _matmul_check(m, [(20, 24, 18)], dtype=torch.float16)
