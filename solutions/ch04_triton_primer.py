"""Chapter 04: first Triton kernels. Each kernel comes with its launcher (given, do not edit).

A kernel runs as a grid of programs; each program handles one block of the data: it computes the
offsets of its elements, loads them through pointers (with a mask at the ragged edge), computes,
and stores. Without a GPU, the same kernels run in Triton's interpreter on CPU tensors.
Run `flashcourse grade ch04` to check your work.
"""

import flashcourse  # noqa: F401  (imported before triton: switches the interpreter on without a GPU)
import torch
import triton
import triton.language as tl

from flashcourse.grading import require_implemented, require_kernel_dtype


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[i] = x[i] + y[i] for the BLOCK elements i of this program; x, y, out are 1-d of n elements.

    Program p handles i = p · BLOCK + 0, 1, ..., BLOCK − 1; the grid has cdiv(n, BLOCK) programs, so
    the last one runs past n.

    Hints:
      1. offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
      2. mask = offs < n; pass it to tl.load and tl.store, or the last program reads past the end.
      3. tl.load(x_ptr + offs, mask=mask), then tl.store(out_ptr + offs, x + y, mask=mask).
    """
    ### BEGIN SOLUTION
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)
    ### END SOLUTION


def add(x: torch.Tensor, y: torch.Tensor, BLOCK: int = 64) -> torch.Tensor:
    """Given launcher: x + y for 1-d tensors of the same shape, one program per BLOCK elements."""
    require_implemented(add_kernel)
    require_kernel_dtype(x, y)
    out = torch.empty_like(x)
    n = x.numel()
    add_kernel[(triton.cdiv(n, BLOCK),)](x, y, out, n, BLOCK=BLOCK)
    return out


@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    """out[r, :] = softmax(x[r, :]) for the row r = tl.program_id(0); BLOCK >= n_cols is a power of two.

    Row r starts at x_ptr + r · stride_row; its columns are contiguous. Compute in float32:
    softmax(x) = exp(x − max x) / Σ exp(x − max x), and store in out's dtype.

    Hints:
      1. cols = tl.arange(0, BLOCK); mask = cols < n_cols.
      2. Load with other=float("-inf"): padded columns then add exp(−inf) = 0 to the sum.
      3. tl.max(x, axis=0) and tl.sum(e, axis=0) reduce the row; .to(tl.float32) upcasts a float16 row.
      4. Store e / sum with .to(out_ptr.dtype.element_ty) and the same mask.
    """
    ### BEGIN SOLUTION
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    # e = exp(x − max x)
    e = tl.exp(x - tl.max(x, axis=0))
    # softmax = e / Σ e
    y = e / tl.sum(e, axis=0)
    tl.store(out_ptr + row * stride_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    ### END SOLUTION


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Given launcher: softmax over the last dim of a 2-d tensor (M, N), one program per row."""
    require_implemented(softmax_kernel)
    require_kernel_dtype(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    M, N = x.shape
    softmax_kernel[(M,)](x, out, N, x.stride(0), BLOCK=triton.next_power_of_2(N))
    return out


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A B for the (BLOCK_M, BLOCK_N) tile of C at program (tl.program_id(0), tl.program_id(1)).

    A is (M, K), B is (K, N), C is (M, N), each with its own strides (B may be a transposed view).
    Walk over K in steps of BLOCK_K, loading a (BLOCK_M, BLOCK_K) tile of A and a (BLOCK_K, BLOCK_N)
    tile of B, and accumulate acc += A_tile @ B_tile in float32 with tl.dot.

    Hints:
      1. offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M); likewise offs_n; offs_k = k0 + tl.arange(0, BLOCK_K).
      2. The tile of A: a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak.
      3. Mask every load on both of its dims (other=0.0): zeros add nothing to the dot product.
      4. acc = tl.dot(a, b, acc); store acc.to(c_ptr.dtype.element_ty) under the (M, N) mask.
    """
    ### BEGIN SOLUTION
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        # acc += A_tile B_tile
        acc = tl.dot(a, b, acc)
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    ### END SOLUTION


def matmul(a: torch.Tensor, b: torch.Tensor, BLOCK_M: int = 16, BLOCK_N: int = 16, BLOCK_K: int = 16) -> torch.Tensor:
    """Given launcher: a (M, K) @ b (K, N) -> (M, N) in a's dtype, one program per (BLOCK_M, BLOCK_N) tile."""
    require_implemented(matmul_kernel)
    require_kernel_dtype(a, b)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    matmul_kernel[grid](a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return c
