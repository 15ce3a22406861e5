"""Chapter 04: vector add, row softmax and a tiled matmul in Triton, against torch.

On the CPU every tensor a kernel gets ends right before a page that cannot be read, so a load or a
store without the right mask crashes (reported as "read past the end of add_kernel's x_ptr"); on a
GPU the tensors are followed by NaN, and a store past the end is seen. The kernels that take strides
also run on rows further apart than their length and on transposed views (drivers, below).
"""

import torch
import triton

from ..framework import ChapterChecks, case_name, expect_close, randn, require_implemented, tolerance
from ._common import device, kernel_dtypes, transposed

CHECKS = ChapterChecks("ch04", file="ch04_triton_primer", notebook="04_triton_primer")
MASK_HINT = "mask = offs < n, passed to both tl.load and tl.store: the last program runs past n"


def _t(*shape, seed, dtype=torch.float32, scale=1.0):
    return randn(*shape, seed=seed, dtype=dtype, scale=scale).to(device())


def _add_check(m, sizes, dtype=torch.float32):
    for n, block in sizes:
        x, y = _t(n, seed=n, dtype=dtype), _t(n, seed=n + 1, dtype=dtype)
        got = m.add(x, y) if block is None else m.add(x, y, BLOCK=block)
        expect_close("add(x, y) vs x + y", got, x + y, atol=0, case=case_name(n=n, BLOCK=block or 64, dtype=dtype),
                     dtype=dtype)


@CHECKS.add("add_kernel", "n a multiple of BLOCK", hint="offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
def _(m):
    _add_check(m, [(64, None), (256, None)])


@CHECKS.add("add_kernel", "n not a multiple of BLOCK", points=2, hint=MASK_HINT)
def _(m):
    _add_check(m, [(1, 64), (100, 64), (1000, 128), (77, 16)])


@CHECKS.add("add_kernel", "float16 (and bfloat16 on a GPU)", hint="tl.load keeps the dtype of the pointer: no cast is needed")
def _(m):
    for dtype in kernel_dtypes()[1:]:
        _add_check(m, [(100, 64)], dtype)


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
            hint="mask = cols < n_cols; load the padded columns with other=float('-inf') so that they add "
                 "exp(−inf) = 0 to the sum")
def _(m):
    _softmax_check(m, [(5, 1), (3, 37), (2, 100)])


@CHECKS.driver
def softmax_strided(module, x, pad: int):
    """Worker side: the learner's softmax_kernel on rows ``pad`` elements further apart than their length."""
    require_implemented(module.softmax_kernel)
    M, N = x.shape
    rows = torch.full((M, N + pad), float("nan"), dtype=x.dtype, device=x.device)
    rows[:, :N] = x
    out = torch.full_like(rows, float("nan"))
    module.softmax_kernel[(M,)](rows[:, :N], out[:, :N], N, rows.stride(0), BLOCK=triton.next_power_of_2(N))
    return out[:, :N]


@CHECKS.add("softmax_kernel", "rows further apart than their length (stride_row)",
            hint="row r of x and of out starts at + r * stride_row (not r * n_cols): the rows of a tensor need not touch")
def _(m):
    x = _t(4, 37, seed=3)
    expect_close("softmax_kernel on rows 48 apart vs torch.softmax(x, dim=-1)", m.run("softmax_strided", x, 11),
                 torch.softmax(x.double(), dim=-1), case="M=4 N=37 stride_row=48", dtype=x.dtype, **tolerance(x.dtype))


@CHECKS.add("softmax_kernel", "large logits, float16 (and bfloat16 on a GPU)",
            hint="subtract the row max; compute in float32 and store in out's dtype")
def _(m):
    _softmax_check(m, [(3, 37)], scale=1000.0)
    for dtype in kernel_dtypes()[1:]:
        _softmax_check(m, [(3, 37)], dtype=dtype, scale=3.0)


# float32 dots may run as TF32 on a GPU: a tolerance that still catches any real bug; float16 and bfloat16
# products are exact in float32, so only the rounding of C is allowed (and a float16 accumulator is caught)
MATMUL_TOLERANCE = {torch.float32: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


@CHECKS.driver
def matmul_transposed_c(module, a, b):
    """Worker side: the learner's matmul_kernel writing C through a transposed view (stride_cn > stride_cm)."""
    require_implemented(module.matmul_kernel)
    (M, K), N = a.shape, b.shape[1]
    c = torch.full((N, M), float("nan"), dtype=a.dtype, device=a.device).t()
    grid = (triton.cdiv(M, 16), triton.cdiv(N, 16))
    module.matmul_kernel[grid](a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    return c


def _matmul_check(m, shapes, dtype=torch.float32, layout=""):
    for n, (M, K, N) in enumerate(shapes):
        a, b = _t(M, K, seed=n, dtype=dtype), _t(K, N, seed=n + 1, dtype=dtype)
        a, b = (transposed(a) if "a" in layout else a), (transposed(b) if "b" in layout else b)
        want = a.double() @ b.double()
        case = case_name(M=M, K=K, N=N, dtype=dtype) + "".join(f" {x}=transposed view" for x in layout)
        atol, rtol = MATMUL_TOLERANCE[dtype]
        got = m.run("matmul_transposed_c", a, b) if "c" in layout else m.matmul(a, b)
        expect_close("matmul(a, b) vs a @ b", got, want, atol=atol, rtol=rtol, case=case, dtype=dtype,
                     dtype_hint="store acc.to(c_ptr.dtype.element_ty): C has a's dtype")


@CHECKS.add("matmul_kernel", "sizes multiples of the blocks", points=2,
            hint="acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32); for k0 in range(0, K, BLOCK_K): acc = tl.dot(a, b, acc)")
def _(m):
    _matmul_check(m, [(16, 16, 16), (32, 48, 16)])


@CHECKS.add("matmul_kernel", "ragged M, N, K", points=2,
            hint="mask each load on both of its dims with other=0.0, and the store on (M, N)")
def _(m):
    _matmul_check(m, [(1, 5, 7), (37, 20, 33)])


@CHECKS.add("matmul_kernel", "strided a, b and c (transposed views)",
            hint="address every tensor with both its strides: a_ptr + offs_m[:, None] * stride_am + "
                 "offs_k[None, :] * stride_ak, and likewise b (stride_bk, stride_bn) and c (stride_cm, stride_cn)")
def _(m):
    _matmul_check(m, [(20, 24, 18)], layout="a")
    _matmul_check(m, [(20, 24, 18)], layout="b")
    _matmul_check(m, [(33, 17, 9)], layout="ab")
    _matmul_check(m, [(20, 24, 18)], layout="c")


@CHECKS.add("matmul_kernel", "float16 (and bfloat16 on a GPU), K = 256",
            hint="accumulate in float32 (acc = tl.zeros(..., tl.float32)), and store in c's dtype only at the end")
def _(m):
    for dtype in kernel_dtypes()[1:]:
        _matmul_check(m, [(20, 24, 18), (20, 256, 18)], dtype=dtype)
