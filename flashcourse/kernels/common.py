"""What every Triton kernel of the course shares: how it runs here, a dot and a cast that are right
everywhere, and masked tile loads and stores.

Three traps of Triton's CPU interpreter (seen with Triton 3.9) are handled here, once:
- ``tl.dot`` multiplies the raw bit patterns of bfloat16 operands, which gives garbage: ``dot``
  upcasts them to float32 there (``UPCAST``);
- ``x.to(tl.bfloat16)`` truncates float32 instead of rounding to nearest even as a GPU does:
  ``to_dtype`` rounds by bit arithmetic there;
- ``x.to(tl.float8e4nv)`` (e4m3, FP8) loses the carry when rounding up reaches the next power of two
  (127.5 becomes 64, not 128), rounds ties away from zero, and mis-rounds subnormals: ``to_dtype``
  rounds to the e4m3 grid by hand there, as the GPU's ``cvt.rn.satfinite`` does.
On a GPU these are plain ``tl.dot`` and ``.to``: the interpreter branches are compile-time constants.
"""

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from .._env import INTERPRET

# float32 -> bfloat16 and -> e4m3 round by hand only in the interpreter (a compile-time constant of every kernel)
ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(INTERPRET)
E4M3_SMALLEST_NORMAL: tl.constexpr = tl.constexpr(2.0**-6)
E4M3_MAX: tl.constexpr = tl.constexpr(448.0)


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether ``dot`` must upcast its operands to float32 for tensors of this dtype: the interpreter's
    ``tl.dot`` is wrong for bfloat16 operands; on a GPU the tensor cores take bfloat16 directly."""
    return INTERPRET and dtype == torch.bfloat16


def dot_args(dtype: torch.dtype) -> dict:
    """The compile-time arguments of ``dot`` for q, k, v of this dtype: ``UPCAST`` and ``DOT_PRECISION``.

    UPCAST: ``upcast_dots(dtype)``.

    DOT_PRECISION (the float32 contract): float32 tiles are multiplied as PyTorch's own float32
    matmuls are, following ``torch.get_float32_matmul_precision()``: "highest" (PyTorch's default)
    -> "ieee", exact float32 products; "high" or "medium" -> "tf32", the tensor cores' 10-bit
    mantissa. float16 and bfloat16 products are exact either way ("tf32", Triton's default, is kept
    for them). The value is part of every kernel's compile and autotuning key.
    """
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(UPCAST=upcast_dots(dtype), DOT_PRECISION="ieee" if ieee else "tf32")


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """The float32 tile x as ``dtype``, rounded to nearest (ties to even) on the GPU and in the interpreter.

    Every narrowing cast of the kernels goes through here: P and dS before their dots (in ``dot``),
    and the stores of O, dQ, dK, dV. To e4m3 (``tl.float8e4nv``) it saturates at ±448.
    """
    if ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # round half to even at bit 16: add 0x7FFF and the lowest bit that is kept, then drop 16 bits
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # a NaN stays a (quiet) NaN: the carry could have turned its payload into inf or a sign flip
        bits = tl.where(x != x, bits | 0x400000, rounded)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif ROUND_BF16_BY_HAND and dtype == tl.float8e4nv:
        # the value on e4m3's grid, in float32, which the interpreter then converts exactly
        return _round_to_e4m3(x).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _round_to_e4m3(x):
    """x rounded to the nearest e4m3 number (ties to even), saturated at ±448, as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    # normal numbers keep 3 of float32's 23 mantissa bits: round half to even at bit 20 (a carry out of
    # the mantissa raises the exponent, as it should)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # subnormals (|x| < 2⁻⁶) are multiples of 2⁻⁹: float32's own addition rounds to them (2¹⁴ = 2⁻⁹ · 2²³)
    tiny = (tl.abs(x) + 16384.0) - 16384.0
    rounded = tl.where(tl.abs(x) < E4M3_SMALLEST_NORMAL, tl.where(x < 0, -tiny, tiny), normal)
    return tl.where(x != x, x, tl.minimum(tl.maximum(rounded, -E4M3_MAX), E4M3_MAX))


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation (acc None: a fresh float32 tile).

    A float32 tile ``a`` (P or dS) is first rounded to b's dtype with ``to_dtype``, as the tensor
    cores multiply two tiles of one dtype; UPCAST multiplies in float32 (bfloat16 in the interpreter).
    """
    if a.dtype != b.dtype:
        a = to_dtype(a, b.dtype)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def quiet_interpreter():
    """NumPy's floating-point warnings silenced while the interpreter runs a kernel.

    NaN or inf in the inputs make NumPy warn ("invalid value encountered in matmul") from inside
    Triton's interpreter; the same arithmetic on a GPU is silent, and the NaN reaches the output
    either way. Every kernel launch of the package runs inside this context.
    """
    return np.errstate(all="ignore") if INTERPRET else contextlib.nullcontext()


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
