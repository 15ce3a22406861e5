"""``flashcourse doctor``: what this machine runs the course on, which chapters run here, and proof that a kernel launches."""

import argparse
import os
import platform
import shutil
import sys

import torch

from ._env import CUDA_BUILT, HAS_CUDA, HAS_TRITON, INTERPRET, resolve_device

# the chapters that need only PyTorch, and those that need Triton (published for Linux only)
PYTORCH_CHAPTERS = "00–03 and 06"
TRITON_CHAPTERS = "04, 05 and 07–10"
LINUX_ROUTES = "WSL2 on Windows, a Linux container (Docker) on macOS or Windows, or a hosted notebook such as Colab"


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

    device = resolve_device(None)
    x, y = torch.randn(100, device=device), torch.randn(100, device=device)
    out = torch.full_like(x, float("nan"))
    add_kernel[(1,)](x, y, out, x.numel(), BLOCK=128)
    err = (out - (x + y)).abs().max().item()
    return err == 0.0, err


def platform_name(system: str = None, release: str = None, machine: str = None) -> str:
    """"Linux 6.8 (x86_64)", "Linux under WSL2 (x86_64)", "macOS 14.5 (arm64)", "Windows 11 (AMD64)"."""
    system, release, machine = system or platform.system(), release or platform.release(), machine or platform.machine()
    if system == "Darwin":
        return f"macOS {platform.mac_ver()[0] or release} ({machine})"
    if system == "Linux" and "microsoft" in release.lower():
        return f"Linux under WSL2 ({machine})"
    return f"{system} {release} ({machine})"


def course_support(system: str, has_triton: bool, interpret: bool) -> str:
    """One line: which chapters of the course run on this machine, and what to do about the rest."""
    if not has_triton:
        if system == "Linux":
            fix = "install it with `pip install triton` (README, Quickstart)"
        else:
            fix = f"Triton publishes wheels for Linux only, so run those chapters on Linux: {LINUX_ROUTES} (README, 'Which machines')"
        return (f"chapters {PYTORCH_CHAPTERS} (PyTorch) run here; chapters {TRITON_CHAPTERS} need Triton, "
                f"which is not installed: {fix}")
    if interpret:
        return "every chapter runs here, the kernels in Triton's CPU interpreter (correct but slow: no GPU timings)"
    return "every chapter runs here, the kernels compiled for the GPU"


def _torch_build() -> str:
    if not CUDA_BUILT:
        return f"{torch.__version__} (CPU-only build)"
    return f"{torch.__version__} (CUDA {torch.version.cuda} build)"


def _device() -> str:
    if HAS_CUDA:
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    cpu = f"CPU only ({platform.processor() or platform.machine()})"
    if shutil.which("nvidia-smi") and not CUDA_BUILT:
        return cpu + "; an NVIDIA driver is installed but this PyTorch is a CPU-only build: install the CUDA build (README)"
    if CUDA_BUILT:
        return cpu + "; this PyTorch is a CUDA build but sees no GPU (check `nvidia-smi`)"
    return cpu


def report() -> list:
    """(name, value) rows describing the machine and what of the course runs on it."""
    rows = [
        ("python", platform.python_version()),
        ("platform", platform_name()),
        ("torch", _torch_build()),
    ]
    if HAS_TRITON:
        import triton

        rows.append(("triton", triton.__version__))
    else:
        rows.append(("triton", "not installed"))
    rows.append(("device", _device()))
    if HAS_CUDA:
        rows.append(("cuda", str(torch.version.cuda)))
    if HAS_TRITON:
        mode = "interpreter (TRITON_INTERPRET=1): kernels run on the CPU, slowly" if INTERPRET else "compiled for the GPU"
        rows.append(("triton mode", mode))
    rows.append(("course", course_support(platform.system(), HAS_TRITON, INTERPRET)))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        rows.append(("jupyter", "you are root (a container?): start Jupyter with `jupyter lab --allow-root notebooks/`"))
    return rows


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="flashcourse doctor",
        description="Report Python, the platform, PyTorch, Triton and the device; say which chapters of the "
                    "course run on this machine; launch a tiny Triton kernel and check its result. "
                    "Exit status 0 when the whole course runs here, 1 otherwise.",
    )


def main(argv=None) -> int:
    _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    for name, value in report():
        print(f"{name:>12}  {value}")
    if not HAS_TRITON:
        print(f"{'kernel':>12}  not launched: Triton is not installed")
        print(f"\nverdict: PARTIAL — chapters {PYTORCH_CHAPTERS} run here; the Triton chapters need Triton "
              f"(see the 'course' line above).")
        return 1
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
