"""What a grading check is, how it compares a learner's tensor to the oracle, and how it reports a miss.

A check is a small function ``run(m)`` that calls the learner's module ``m`` (a file of the target
folder, e.g. ``exercises/ch02_softmax.py``) on a few cases and compares each result with ``flashcourse``.
It passes by returning; it fails by raising ``CheckFailed`` with one short line (what was compared,
the case, the max abs error and where). Any other exception of the learner's code fails only that
check, and a stub's ``NotImplementedError`` is reported as "not implemented yet".
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

STUB_SUFFIX = "not implemented yet"

# chapter id -> the file name (without .py) that exercises/ and solutions/ share
CHAPTERS = {
    "ch01": "ch01_naive",
    "ch02": "ch02_softmax",
    "ch03": "ch03_tiling",
    "ch04": "ch04_triton_primer",
    "ch05": "ch05_triton_forward",
    "ch06": "ch06_backward",
    "ch07": "ch07_triton_backward",
    "ch08": "ch08_module",
}


def chapter_id(chapter) -> str:
    """'ch02', 'ch02_softmax', '02', '2' or 2 -> 'ch02'; ValueError naming the chapters otherwise."""
    text = str(chapter).strip().lower()
    text = text[2:] if text.startswith("ch") else text
    number = text.split("_")[0]
    if number.isdigit() and f"ch{int(number):02d}" in CHAPTERS:
        return f"ch{int(number):02d}"
    raise ValueError(f"unknown chapter {chapter!r}; the graded chapters are {', '.join(CHAPTERS)}")


class CheckFailed(AssertionError):
    """A result differs from the oracle; the message is the one line the report shows."""


def stub_message(qualname: str, chapter: str) -> str:
    """The message of a stub: 'ch02.online_softmax: not implemented yet'."""
    return f"{chapter}.{qualname}: {STUB_SUFFIX}"


def require_implemented(kernel) -> None:
    """Raise NotImplementedError before launching a Triton kernel whose body is still the stub.

    The stub's message is a constant of the kernel's code, so this needs neither its source nor a
    compiler: a launcher calls it first, and the learner sees "not implemented yet", not a traceback.
    """
    fn = getattr(kernel, "fn", kernel)
    for const in fn.__code__.co_consts:
        if isinstance(const, str) and const.endswith(STUB_SUFFIX):
            raise NotImplementedError(const)


@dataclass(frozen=True)
class Check:
    """One graded check of one exercise; ``run(m)`` raises on failure."""

    chapter: str
    exercise: str
    name: str
    points: int
    hint: str
    run: Callable = field(repr=False)


class ChapterChecks(list):
    """The checks of one chapter, in order; ``@checks.add(exercise, name, points, hint)`` appends one."""

    def __init__(self, chapter: str):
        super().__init__()
        self.chapter = chapter

    def add(self, exercise: str, name: str, *, points: int = 1, hint: str):
        def register(run):
            self.append(Check(self.chapter, exercise, name, points, hint, run))
            return run

        return register


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}"
    return type(t).__name__


def expect_close(what: str, got, want: torch.Tensor, *, atol: float, rtol: float = 0.0, case: str = "",
                 dtype: Optional[torch.dtype] = None) -> None:
    """got must be a tensor of want's shape (and of ``dtype`` when given), finite where want is, and close.

    Raises CheckFailed naming ``what`` ("O vs flashcourse.naive_attention"), the ``case``, the max abs
    error and its index, and the tolerance.
    """
    where = f" [{case}]" if case else ""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}{where}: expected a tensor of shape {tuple(want.shape)}, got {describe(got)}")
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what}{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if dtype is not None and got.dtype != dtype:
        raise CheckFailed(f"{what}{where}: dtype {got.dtype}, expected {dtype}")
    g, w = got.detach().to(torch.float64).cpu(), want.detach().to(torch.float64).cpu()
    # infinities must match exactly (e.g. lse = -inf for a row that sees no key); NaN never passes
    bad_inf = torch.isinf(w) & (g != w)
    if torch.isnan(g).any() or bad_inf.any():
        idx = tuple(torch.nonzero(torch.isnan(g) | bad_inf)[0].tolist())
        raise CheckFailed(f"{what}{where}: got {g[idx].item()} at {list(idx)}, want {w[idx].item()}, "
                          f"shape {tuple(want.shape)}")
    finite = torch.isfinite(w)
    err = torch.where(finite, (g - w).abs(), 0.0)
    # also catch +-inf in got where the oracle is finite
    err = torch.where(finite & ~torch.isfinite(g), float("inf"), err)
    excess = err - (atol + rtol * w.abs().nan_to_num(posinf=0.0, neginf=0.0))
    if (excess > 0).any():
        at = lambda t: tuple(int(i) for i in torch.unravel_index(t.argmax(), t.shape)) if t.dim() else ()  # noqa: E731
        # the largest error, and the element furthest outside its tolerance when that is another one
        imax, idx = at(err), at(excess)
        worst = "" if imax == idx else f"; furthest outside the tolerance at {list(idx)}"
        raise CheckFailed(f"{what}{where}: max abs error {err.max().item():.3g} at {list(imax)}{worst} "
                          f"(got {g[idx].item():.4g}, want {w[idx].item():.4g}; tol {atol:.0e}"
                          f"{f'+{rtol:.0e}·|want|' if rtol else ''}), shape {tuple(want.shape)}")


def expect(condition: bool, message: str) -> None:
    """A plain condition of a check (e.g. a returned tuple has two entries)."""
    if not condition:
        raise CheckFailed(message)


def randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Reproducible N(0, scale²) samples in ``dtype``, drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def qkv(B, H, Nq, Nk, d, *, seed: int, dtype=torch.float32):
    """Random q (B, H, Nq, d), k and v (B, H, Nk, d)."""
    return (randn(B, H, Nq, d, seed=seed, dtype=dtype), randn(B, H, Nk, d, seed=seed + 1, dtype=dtype),
            randn(B, H, Nk, d, seed=seed + 2, dtype=dtype))


def case_name(**kw) -> str:
    """'B=1 H=2 Nq=17 Nk=33 d=16 float16 causal' from keyword arguments (bools print by name when True)."""
    parts = []
    for k, v in kw.items():
        if isinstance(v, bool):
            parts += [k] if v else []
        elif isinstance(v, torch.dtype):
            parts.append(str(v).replace("torch.", ""))
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


# (atol, rtol) against the float64 oracle, per input dtype
TOLERANCE = {torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 2e-2), torch.float32: (1e-4, 1e-4),
             torch.float64: (1e-9, 1e-9)}


def tolerance(dtype: torch.dtype, kernel: bool = False) -> dict:
    """{'atol': ..., 'rtol': ...} for results computed from inputs of this dtype.

    kernel: a Triton kernel's result; on a GPU its float32 tl.dot runs as TF32 (10-bit mantissa).
    """
    atol, rtol = TOLERANCE[dtype]
    if kernel and dtype == torch.float32 and torch.cuda.is_available():
        atol, rtol = 1e-2, 1e-2
    return {"atol": atol, "rtol": rtol}
