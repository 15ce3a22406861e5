"""``flashcourse doctor``: what this machine runs the course on, and proof that a kernel launches."""

import platform
import sys

import torch

from ._env import HAS_CUDA, INTERPRET


def _launch_tiny_kernel():
    """Launch a 1-block Triton kernel that adds two vectors; return (ok, max abs error)."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, x + y, mask=mask)

    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    x, y = torch.randn(100, device=device), torch.randn(100, device=device)
    out = torch.full_like(x, float("nan"))
    add_kernel[(1,)](x, y, out, x.numel(), BLOCK=128)
    err = (out - (x + y)).abs().max().item()
    return err == 0.0, err


def report() -> list:
    """(name, value) rows describing the machine."""
    import triton

    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
    ]
    if HAS_CUDA:
        p = torch.cuda.get_device_properties(0)
        rows.append(("device", f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)"))
        rows.append(("cuda", str(torch.version.cuda)))
    else:
        rows.append(("device", f"CPU only ({platform.processor() or platform.machine()})"))
    mode = "interpreter (TRITON_INTERPRET=1): kernels run on the CPU, slowly" if INTERPRET else "compiled for the GPU"
    rows.append(("triton mode", mode))
    return rows


def main() -> int:
    for name, value in report():
        print(f"{name:>12}  {value}")
    try:
        ok, err = _launch_tiny_kernel()
    except Exception as exc:  # the verdict must name what went wrong, whatever it is
        print(f"{'kernel':>12}  FAILED to launch: {type(exc).__name__}: {exc}")
        ok = False
    else:
        print(f"{'kernel':>12}  vector add launched, max abs error {err:g}")
    if ok:
        where = "on the GPU" if not INTERPRET else "in the CPU interpreter (notebooks and grading work; timings are not GPU timings)"
        print(f"\nverdict: OK — Triton kernels run {where}.")
        return 0
    print("\nverdict: PROBLEM — a Triton kernel did not run correctly. Check that torch and triton are "
          "installed as the README says, and on a CPU-only machine import flashcourse before triton.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
