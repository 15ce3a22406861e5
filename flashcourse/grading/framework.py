"""What a grading check is, how it compares a learner's result with the oracle, and how it reports a miss.

A check is a function ``run(m)`` that runs in the grader: it builds the inputs, calls the learner's
code through ``m`` (``m.naive_attention(q, k, v)`` runs in the worker process and returns plain
data), computes the oracle on its own copy of the inputs and compares. It passes by returning; it
fails by raising ``CheckFailed`` with one short line (what was compared, the case, the max abs error
and where) and, when the failure itself says what to fix, a hint of its own.

A chapter is one module ``flashcourse/grading/checks/chNN.py`` holding ``CHECKS = ChapterChecks(...)``:
its checks, what each exercise must define, and the worker-side drivers of calls that are more than
one function call (e.g. building an ``nn.Module``). Adding a chapter is that file plus its solution.
"""

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .wire import Opaque

STUB_SUFFIX = "not implemented yet"


class CheckFailed(AssertionError):
    """A result differs from the oracle; the message is the one line the report shows.

    hint: what to do about this very failure (e.g. a wrong dtype); None keeps the check's own hint.
    """

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


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


def require_kernel_dtype(*tensors: torch.Tensor) -> None:
    """Raise TypeError for bfloat16 inputs of a learner's kernel when Triton runs in its CPU interpreter:
    there (Triton 3.9) bfloat16 arithmetic, ``tl.dot`` and casts give garbage. On a GPU, bfloat16 runs
    and is graded; on the CPU the exercises' launchers call this first, and bfloat16 is not graded."""
    from .._env import INTERPRET

    if INTERPRET and any(t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError("bfloat16 kernels need a GPU: Triton's CPU interpreter computes bfloat16 arithmetic "
                        "wrongly; use float16 or float32 on the CPU")


@dataclass(frozen=True)
class Check:
    """One graded check of one exercise; ``run(m)`` raises on failure."""

    chapter: str
    exercise: str
    name: str
    points: int
    hint: str
    run: Callable = field(repr=False)


@dataclass(frozen=True)
class Exercise:
    """What the grader asks of one exercise besides its results.

    defines: the names (``f``, ``Class.method``, a kernel) that the submission file itself must define;
    allow: qualified names of flashcourse functions it may call besides ``ALLOWED`` (the stubs' helpers);
    forbid: names of library functions that do the exercise's work and that it may not call (e.g.
    ``softmax`` in a softmax exercise, ``run_backward``, i.e. autograd, in a backward pass);
    instead: what to do, said when it calls one (default: write it yourself).
    """

    name: str
    defines: tuple
    allow: tuple = ()
    forbid: tuple = ()
    instead: str = ""


# flashcourse code that any exercise may run: the grader's own helpers and what the stubs import
ALLOWED = ("flashcourse.grading.", "flashcourse.kernels.common.load_tile", "flashcourse.kernels.common.store_tile",
           "flashcourse.kernels.common.dot")
# what the submission may use of the grader (the stubs import them)
GRADER_NAMES = ("require_implemented", "require_kernel_dtype")
# library functions that compute attention, its softmax or its gradients: the exercises that are about them
ATTENTION = ("scaled_dot_product_attention", "_scaled_dot_product_attention_math", "multi_head_attention_forward")
SOFTMAX = ("softmax", "log_softmax", "_softmax", "_log_softmax", "special_softmax", "special_log_softmax")
AUTOGRAD = ("run_backward", "_engine_run_backward")


class ChapterChecks(list):
    """The checks of one chapter, in order.

    chapter: 'ch02'; file: the exercise file's stem ('ch02_softmax'); notebook: the notebook's stem.
    ``@checks.add(exercise, name, points=, hint=)`` appends a check; ``checks.exercise(...)`` declares
    what an exercise must define when that is not just its name; ``@checks.driver`` registers a
    function ``driver(module, ...)`` that the worker runs on the learner's module.
    """

    def __init__(self, chapter: str, *, file: str, notebook: str):
        super().__init__()
        self.chapter, self.file, self.notebook = chapter, file, notebook
        self.exercises: dict = {}
        self.drivers: dict = {}

    def exercise(self, name: str, *, defines: Optional[tuple] = None, allow: tuple = (), forbid: tuple = (),
                 instead: str = "") -> Exercise:
        self.exercises[name] = Exercise(name, tuple(defines or (name,)), tuple(allow), tuple(forbid), instead)
        return self.exercises[name]

    def spec(self, name: str) -> Exercise:
        return self.exercises.get(name) or Exercise(name, (name,))

    def add(self, exercise: str, name: str, *, points: int = 1, hint: str):
        def register(run):
            self.append(Check(self.chapter, exercise, name, points, hint, run))
            return run

        return register

    def driver(self, fn):
        self.drivers[fn.__name__] = fn
        return fn


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}"
    if isinstance(t, Opaque):
        return t.reason or t.type_name
    return type(t).__name__


def expect_tensor(what: str, got, want_shape, *, dtype: Optional[torch.dtype] = None, case: str = "",
                  dtype_hint: Optional[str] = None) -> None:
    """got is a plain tensor of ``want_shape`` (and ``dtype`` when given); CheckFailed with a fitting hint."""
    where = f" [{case}]" if case else ""
    shape = tuple(want_shape)
    if not isinstance(got, torch.Tensor):
        hint = ("return a plain torch.Tensor (not a subclass, not on another device)" if isinstance(got, Opaque)
                else f"return a torch.Tensor of shape {shape}")
        raise CheckFailed(f"{what}{where}: expected a tensor of shape {shape}, got {describe(got)}", hint)
    if tuple(got.shape) != shape:
        raise CheckFailed(f"{what}{where}: shape {tuple(got.shape)}, expected {shape}",
                          f"the result must have shape {shape}: check which dims you reduce, transpose or slice")
    if dtype is not None and got.dtype != dtype:
        raise CheckFailed(f"{what}{where}: dtype {got.dtype}, expected {dtype}",
                          dtype_hint or f"return the result in {dtype}: compute in float32 if you like, "
                                        f"then convert with .to({dtype})")


def expect_close(what: str, got, want: torch.Tensor, *, atol: float, rtol: float = 0.0, case: str = "",
                 dtype: Optional[torch.dtype] = None, dtype_hint: Optional[str] = None) -> None:
    """got must be a tensor of want's shape (and of ``dtype`` when given), finite where want is, and close.

    Raises CheckFailed naming ``what`` ("O vs flashcourse.naive_attention"), the ``case``, the max abs
    error and its index, and the tolerance.
    """
    expect_tensor(what, got, want.shape, dtype=dtype, case=case, dtype_hint=dtype_hint)
    where = f" [{case}]" if case else ""
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


def expect(condition: bool, message: str, hint: Optional[str] = None) -> None:
    """A plain condition of a check (e.g. a returned tuple has two entries)."""
    if not condition:
        raise CheckFailed(message, hint)


_OFFSET = [0]  # added to every seed of a check while one submission file is graded (see ``seeded``)


@contextlib.contextmanager
def seeded(source: Optional[str]):
    """While one submission file is graded, every seed of its checks is offset by a hash of its text: the
    same file always gets the same inputs (and the same score), and no file can hold the answers to its
    own inputs (they change with every character of it)."""
    _OFFSET[0] = int(hashlib.sha256(source.encode()).hexdigest()[:6], 16) * 1000 if source else 0
    try:
        yield
    finally:
        _OFFSET[0] = 0


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + _OFFSET[0])


def randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Reproducible N(0, scale²) samples in ``dtype``, drawn in float64 (seeded per submission, see ``seeded``)."""
    return (torch.randn(*shape, generator=_generator(seed), dtype=torch.float64) * scale).to(dtype)


def uniform(low: float, high: float, *, seed: int) -> float:
    """A reproducible number in [low, high) (seeded per submission, see ``seeded``)."""
    return low + (high - low) * torch.rand((), generator=_generator(seed), dtype=torch.float64).item()


def qkv(B, H, Nq, Nk, d, *, seed: int, dtype=torch.float32, scale: float = 1.0):
    """Random q (B, H, Nq, d), k and v (B, H, Nk, d); q and k of standard deviation ``scale``."""
    return (randn(B, H, Nq, d, seed=seed, dtype=dtype, scale=scale),
            randn(B, H, Nk, d, seed=seed + 1, dtype=dtype, scale=scale),
            randn(B, H, Nk, d, seed=seed + 2, dtype=dtype))


def case_name(**kw) -> str:
    """'B=1 H=2 Nq=17 Nk=33 d=16 float16 causal' from keyword arguments (bools print by name when True)."""
    parts = []
    for k, v in kw.items():
        if isinstance(v, bool):
            parts += [k] if v else []
        elif isinstance(v, torch.dtype):
            parts.append(str(v).replace("torch.", ""))
        elif v is not None:
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
