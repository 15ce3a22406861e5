"""What to run and what came out: the ``Plan`` of a benchmark and the ``Measurement`` of each run.

A plan names providers (``providers.PROVIDERS``), modes (``fwd``, ``bwd``, ``fwd+bwd``) and a grid of
shapes: every dtype × head dim d × causal × sequence length N, with B·N = ``tokens`` and
H·d = ``hidden`` unless ``batch`` and ``heads`` are given (16k tokens and 2048 on a GPU, as in the
FlashAttention papers). ``make_plan`` fills what is left out with ``DEFAULTS`` of the device: real
sizes on a GPU, toy sizes on the CPU, where the Triton kernels run in the interpreter.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from .._env import resolve_device
from .providers import PROVIDERS

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

# What an option left out means, on a GPU and on the CPU (interpreted kernels: toy sizes).
DEFAULTS = {
    "cuda": dict(providers=["flashcourse", "naive", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"],
                 modes=["fwd", "bwd"], dtypes=["float16"], head_dims=[64, 128], causal=[False, True],
                 seqlens=[512, 1024, 2048, 4096, 8192, 16384], tokens=16384, hidden=2048, warmup_ms=25, rep_ms=100,
                 min_runs=10),
    "cpu": dict(providers=["flashcourse", "tiled", "naive", "sdpa-flash", "sdpa-math"],
                modes=["fwd", "bwd"], dtypes=["float32"], head_dims=[32], causal=[False, True],
                seqlens=[64, 128], tokens=128, hidden=64, warmup_ms=1, rep_ms=20, min_runs=3),
}


class Shape(NamedTuple):
    """One problem of the grid: q, k, v are (B, H, N, d) of ``dtype`` (a name of ``DTYPES``)."""

    dtype: str
    B: int
    H: int
    N: int
    d: int
    causal: bool


@dataclass
class Plan:
    """What to run: every provider × mode on every shape of the grid, and how to measure it.

    Build one with ``make_plan`` (it fills the device's defaults and checks the names).
    """

    device: str
    providers: List[str]
    modes: List[str]
    dtypes: List[str]
    head_dims: List[int]
    causal: List[bool]
    seqlens: List[int]
    tokens: int  # B·N when ``batch`` is None
    hidden: int  # H·d when ``heads`` is None
    batch: Optional[int] = None
    heads: Optional[int] = None
    warmup_ms: float = 25  # per timing
    rep_ms: float = 100  # timed repetitions per timing
    min_runs: int = 10  # timed calls per timing on the CPU, at least (a GPU's do_bench decides itself)
    check: bool = True  # compare each provider with float64 naive attention before timing it
    tol: Optional[float] = None  # largest relative error of the check; None: ``check.TOLERANCE`` by dtype
    slow_max_n: int = 4096  # the slow providers (``providers.SLOW``) are skipped above this N
    time_budget_s: Optional[float] = None  # shapes not started after this many seconds are skipped
    precompile_processes: int = 0  # > 0: compile the Triton kernels first, in this many processes
    per_config: bool = False  # also time flashcourse with each launch config its autotuner tries
    seed: int = 0
    extra_providers: Dict[str, Callable] = field(default_factory=dict)  # name -> f(q, k, v, causal) -> o

    def shapes(self) -> List[Shape]:
        """The grid, in the order it is run: dtype, then d, then causal, then N."""
        grid = []
        for dtype in self.dtypes:
            for d in self.head_dims:
                for causal in self.causal:
                    for N in self.seqlens:
                        B, H = default_batch_heads(N, d, self.tokens, self.hidden)
                        grid.append(Shape(dtype, self.batch or B, self.heads or H, N, d, causal))
        return grid


@dataclass
class Measurement:
    """What came out of one (provider, mode, shape): ``ms``, ``tflops`` and memory are None unless timed.

    ``status`` is ok, failed (wrong output or gradients), oom, skipped (cannot run here, or no time
    left) or error (any other exception); ``note`` says why. ``config`` names the launch configs
    flashcourse ran with, by kernel (GPU only); ``pinned`` says that per-config timing fixed them
    (otherwise the autotuner chose).
    """

    provider: str
    mode: str
    dtype: str
    B: int
    H: int
    N: int
    d: int
    causal: bool
    status: str = "ok"
    ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None  # peak GPU memory during one call, inputs included; None on the CPU
    peak_over_io: Optional[float] = None  # peak memory / measure.io_bytes(...) of the mode
    max_rel_err: Optional[float] = None  # worst ‖out − ref‖ / ‖ref‖ of the check
    note: str = ""
    config: str = ""
    pinned: bool = False

    @classmethod
    def of(cls, provider: str, mode: str, shape: Shape, **values) -> "Measurement":
        return cls(provider, mode, **shape._asdict(), **values)

    @property
    def shape(self) -> Shape:
        return Shape(self.dtype, self.B, self.H, self.N, self.d, self.causal)


def default_batch_heads(N: int, d: int, tokens: int = 16384, hidden: int = 2048):
    """(B, H) with B·N = ``tokens`` and H·d = ``hidden``, as in the FlashAttention papers (each >= 1)."""
    return max(1, tokens // N), max(1, hidden // d)


def make_plan(device=None, **options) -> Plan:
    """A ``Plan`` from ``options`` (any field of ``Plan``); those left out or None take ``DEFAULTS[device]``.

    ``device`` follows the package's policy (``_env.resolve_device``: None is the GPU when there is
    one, else the CPU). A single value stands for a list of
    one; dtypes may be names or ``torch.dtype``. Unknown providers, modes or dtypes and sizes below 1
    raise ``ValueError`` naming what exists.
    """
    device = resolve_device(device)
    given = {key: value for key, value in options.items() if value is not None}
    plan = Plan(device=str(device), **{**DEFAULTS[device.type], **given})
    for name in ("providers", "modes", "dtypes", "head_dims", "causal", "seqlens"):
        value = getattr(plan, name)
        setattr(plan, name, list(value) if isinstance(value, (list, tuple)) else [value])
    plan.dtypes = [_dtype_name(dt) for dt in plan.dtypes]
    plan.causal = [bool(c) for c in plan.causal]
    _validate(plan)
    return plan


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _validate(plan: Plan) -> None:
    known = {**PROVIDERS, **plan.extra_providers}
    for name, values, choices in (("provider", plan.providers, known), ("mode", plan.modes, MODES),
                                  ("dtype", plan.dtypes, DTYPES)):
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise ValueError(f"unknown {name}(s) {unknown}; choose from {sorted(choices)}")
    sizes = dict(seqlens=plan.seqlens, head_dims=plan.head_dims, tokens=[plan.tokens], hidden=[plan.hidden],
                 batch=[] if plan.batch is None else [plan.batch], heads=[] if plan.heads is None else [plan.heads])
    for name, values in sizes.items():
        if any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} takes positive whole numbers, got {getattr(plan, name)}")

