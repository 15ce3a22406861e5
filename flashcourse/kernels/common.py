"""What every Triton kernel of the course shares: how it runs here, and a dot that is right everywhere."""

import torch
import triton
import triton.language as tl

from .._env import HAS_CUDA, INTERPRET


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether ``dot`` must upcast its operands to float32 for tensors of this dtype.

    Triton's CPU interpreter multiplies the raw bit patterns of bfloat16 operands in ``tl.dot``
    (seen with Triton 3.9), which gives garbage; float32 operands are right. On a GPU the tensor
    cores take bfloat16 directly.
    """
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation; UPCAST=True multiplies in float32 (interpreter bf16)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


def check_kernel_device(**tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors on a GPU machine, and on CPU tensors in the interpreter."""
    for name, t in tensors.items():
        if t.is_cuda or INTERPRET:
            continue
        raise ValueError(
            f"{name} is on {t.device}, but this machine has a CUDA GPU and Triton compiles for it: "
            f"move the inputs to the GPU with {name}.cuda() (or set TRITON_INTERPRET=1 before "
            f"importing flashcourse to run the kernels in the CPU interpreter)"
        )


@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """The tile base[rows, cols] of shape (len(rows), len(cols)), zero outside n_rows × n_cols.

    Swapping (rows, stride_row, n_rows) with (cols, stride_col, n_cols) loads the transposed tile,
    e.g. Kᵀ_j of shape (d, B_c) from a K stored as (N, d).
    """
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def store_tile(base, tile, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """base[rows, cols] = tile, only inside n_rows × n_cols (the padded edges are not written)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * stride_row + cols[None, :] * stride_col, tile, mask=mask)
