"""Launch configurations of the attention kernels (forward, dK/dV, dQ; the forward kernel also as
"decode", with candidates for a few query rows; the dK/dV kernel also as "dkdvdq", the backward in one
kernel that adds dQ with atomics): one table, one resource model, one launch function.

A configuration is (B_r, B_c, warps, pipeline stages, descriptor loads, warp specialization):
``KernelConfig``.
- In the CPU interpreter each kernel runs one small fixed configuration (``INTERPRET_CONFIGS``), so
  that the tests are fast and reach the ragged edges at small N.
- On a GPU, ``triton.autotune`` times the candidates listed in ``CANDIDATES`` for the call's head
  dim and element size that fit on chip (``fits``), once per key (``autotuned``), and reuses the
  fastest for every later call with the same key. Measurements behind the table:
  benchmarks/NOTES_forward.md and benchmarks/NOTES_backward.md (H100).
- A configuration can be pinned, the same one on every run and no autotuning: the ``config``
  arguments of ``attention_forward`` / ``attention_backward``, or the environment variables
  FLASHCOURSE_CONFIG_FORWARD, _DECODE, _DKDV, _DQ, _DKDVDQ, e.g. "128,64,4,2,tma"
  (B_r, B_c, warps, stages; "tma" for descriptor loads of K_j, V_j in the forward kernel, or for
  dQ's additions through a descriptor in "dkdvdq"; "ws" for the forward's warp-specialized key loop).
- FLASHCOURSE_AUTOTUNE=first skips the timing: each call runs the first candidate that fits (the test
  suite does this on a GPU, except in the tests of the autotuner itself, marked ``autotune``).
- Descriptor additions of dQ and warp specialization are experiments (benchmarks/perf_experiments.py):
  the autotuner never tries them, a pinned configuration asks for them.
"""

import os
from typing import NamedTuple, Optional

import torch
import triton

from .._env import INTERPRET
from ..gpumodel import H100_SXM
from ..gpumodel import shared_bytes as gpumodel_shared_bytes
from .common import quiet_interpreter


class KernelConfig(NamedTuple):
    """How one kernel is launched."""

    block_m: int  # B_r: query rows per tile
    block_n: int  # B_c: key rows per tile
    num_warps: int = 4
    num_stages: int = 2
    # forward: load K_j, V_j through tensor descriptors (Hopper's copy engine, TMA); None: where allowed.
    # dkdvdq: add each dQ_i term through a descriptor (a TMA reduction) instead of per-element atomics
    use_tma: Optional[bool] = None
    # forward only: Triton's automatic warp specialization of the key loop (tl.range(warp_specialize=True))
    warp_specialize: bool = False


# "decode" is the forward kernel launched with candidates for a few query rows (B_r = 16); "dkdvdq" is the
# dK/dV kernel that also adds dQ_i = dS_ij K_j with atomics (the non-deterministic backward)
KERNELS = ("forward", "decode", "dkdv", "dq", "dkdvdq")

# Interpreter blocks: B_r != B_c on purpose, so that the CPU tests cross the causal diagonal with
# several blocks per tile, as the GPU configurations do.
INTERPRET_CONFIGS = {
    "forward": KernelConfig(32, 16),
    "decode": KernelConfig(16, 16),
    "dkdv": KernelConfig(16, 32),
    "dq": KernelConfig(32, 16),
    "dkdvdq": KernelConfig(16, 32, use_tma=False),
}
# rows per program of the backward's preprocessing kernel (D_i = rowsum(dO_i ∘ O_i)), not tuned
PREPROCESS_BLOCK_M = 32 if INTERPRET else 64
# rows per program of the split-KV merge (splitkv.py), not tuned
MERGE_BLOCK_M = 16

# The autotuner's candidates, (B_r, B_c, warps, stages), per kernel and per (head dim padded to 64,
# 128 or 256; bytes per element). Forward: B_r = 128 rows fill the 4-warp groups of Hopper's wgmma;
# each shape is also tried with descriptor loads where the layout allows (they won at d = 64 with
# N >= 4096 and with the two-programs-per-SM shape (128, 64, 4, 2) at d = 128). dK/dV: a wide key
# block B_c = 128 wins (32 rows, 4 warps at d <= 64; 64 rows, 8 warps at d = 128). dQ: (128, 64,
# 8 warps, 3 stages) won every measured shape. Larger d and 4-byte elements leave room for fewer or
# smaller stages.
CANDIDATES = {
    "forward": {
        (64, 2): [(128, 64, 4, 3), (128, 128, 4, 3)],
        (128, 2): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2)],
        (256, 2): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
        (64, 4): [(128, 64, 8, 3), (64, 64, 4, 3)],
        (128, 4): [(64, 64, 4, 2), (128, 32, 8, 3)],
        (256, 4): [(64, 32, 4, 2), (32, 32, 4, 2)],
        # FP8 (e4m3, 1 byte; flashcourse.fp8): B_r = 128 and B_c of 64 or 128 rows (both divide the
        # 128 rows that share a descale factor); few candidates, for a short compile
        (64, 1): [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
        (128, 1): [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3)],
        (256, 1): [(128, 64, 8, 2), (64, 64, 4, 2)],
    },
    # decoding (Nq <= 16 rows, e.g. one token, or the H / Hkv query heads of a group as rows): B_r = 16,
    # the smallest tile ``tl.dot`` takes, and long key blocks; memory-bound, so few warps and deep
    # pipelines. Each is also tried with descriptor loads, which Triton pipelines (num_stages buffers)
    "decode": {
        (64, 2): [(16, 64, 4, 3), (16, 128, 4, 3), (16, 256, 8, 2)],
        (128, 2): [(16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 8, 2)],
        (256, 2): [(16, 32, 4, 3), (16, 64, 4, 2)],
        (64, 4): [(16, 64, 4, 3), (16, 128, 4, 2)],
        (128, 4): [(16, 64, 4, 2), (16, 32, 4, 3)],
        (256, 4): [(16, 32, 4, 2)],
    },
    "dkdv": {
        (64, 2): [(32, 128, 4, 4), (64, 128, 8, 3), (32, 64, 4, 3)],
        (128, 2): [(64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
        (256, 2): [(32, 64, 8, 2), (16, 32, 4, 2)],
        (64, 4): [(32, 128, 4, 4), (64, 128, 8, 3), (32, 64, 4, 3)],
        (128, 4): [(32, 64, 4, 3), (32, 64, 8, 2), (16, 32, 4, 2)],
        (256, 4): [(16, 32, 4, 2)],
    },
    "dq": {
        (64, 2): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        (128, 2): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        (256, 2): [(64, 32, 4, 2), (32, 32, 4, 2)],
        (64, 4): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        (128, 4): [(64, 32, 4, 2), (32, 32, 4, 2)],
        (256, 4): [(32, 32, 4, 2)],
    },
}
# the one-kernel backward keeps dK/dV's blocks: dQ_i = dS_ij K_j adds a (B_r, d) tile that lives only
# for one step, like S_ij (not yet measured; benchmarks/NOTES_backward.md)
CANDIDATES["dkdvdq"] = CANDIDATES["dkdv"]

# What a program keeps on chip, in rows of d elements: tiles resident for the whole program, tiles
# streamed once per pipeline stage, and float32 accumulator rows (in registers).
#   forward: Q_i resident; K_j, V_j streamed; acc_i          (B_r × d)
#   dK/dV:   K_j, V_j resident; Q_i, dO_i streamed; dK_j, dV_j (2 B_c × d)
#   dQ:      Q_i, dO_i resident; K_j, V_j streamed; dQ_i       (B_r × d)
#   dK/dV/dQ (dkdvdq): as dK/dV; dQ_i through a descriptor stages B_r × d float32 in shared memory
SHARED_MEMORY_BYTES = H100_SXM.shared_per_program  # the per-program limit of an H100 (227 KiB)
ACCUMULATOR_REGISTERS = 128  # of a thread's 255 registers, at most this many hold accumulators


def _kernel_config(config) -> KernelConfig:
    """A ``KernelConfig`` from itself or from the ``triton.Config`` the autotuner holds."""
    if isinstance(config, triton.Config):
        kw = config.kwargs
        return KernelConfig(kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages, kw.get("USE_TMA"),
                            kw.get("WARP_SPECIALIZE", False))
    return KernelConfig(*config)


def _rows(kernel: str, c: KernelConfig) -> tuple[int, int, int]:
    """(resident, streamed per stage, accumulator) rows of one program."""
    if kernel in ("forward", "decode"):
        return c.block_m, 2 * c.block_n, c.block_m
    if kernel in ("dkdv", "dkdvdq"):
        return 2 * c.block_n, 2 * c.block_m, 2 * c.block_n
    return 2 * c.block_m, 2 * c.block_n, c.block_m


def shared_bytes(config, block_d: int, element_size: int, kernel: str = "forward") -> int:
    """Shared memory of one program: its resident tiles and ``num_stages`` buffers of the streamed ones
    (forward: e · d · (B_r + 2 · stages · B_c), what Triton allocates; ``gpumodel.shared_bytes``).
    ``config``: a ``KernelConfig`` or a ``triton.Config``."""
    c = _kernel_config(config)
    resident, streamed, _ = _rows(kernel, c)
    staged = c.block_m * block_d * 4 if kernel == "dkdvdq" and c.use_tma else 0  # float32 dQ_i for the copy engine
    return gpumodel_shared_bytes(resident, streamed, block_d, c.num_stages, element_size) + staged


def fits(kernel: str, config, block_d: int, element_size: int) -> bool:
    """Whether a program of this configuration fits in an H100's shared memory and registers."""
    c = _kernel_config(config)
    accumulated = _rows(kernel, c)[2]
    registers = accumulated * block_d / (32 * c.num_warps)
    return shared_bytes(c, block_d, element_size, kernel) <= SHARED_MEMORY_BYTES and registers <= ACCUMULATOR_REGISTERS


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """A descriptor needs the last stride 1 and every other stride, and the start, 16-byte aligned."""
    return all(
        t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
        for t in tensors
    )


def length_bucket(n: int) -> int:
    """The autotuning key for a sequence length: its next power of two, at least 128, at most 16384."""
    return min(max(triton.next_power_of_2(n), 128), 16384)


def _triton_config(kernel: str, c: KernelConfig) -> triton.Config:
    """The compile-time arguments and launch options of a configuration, as Triton takes them."""
    meta = {"BLOCK_M": c.block_m}
    if kernel not in ("preprocess", "merge"):  # the backward's preprocessing and split-KV's merge: no key blocks
        meta["BLOCK_N"] = c.block_n
    if kernel in ("forward", "decode", "dkdvdq"):
        meta["USE_TMA"] = bool(c.use_tma)
    if kernel in ("forward", "decode"):
        meta["WARP_SPECIALIZE"] = bool(c.warp_specialize)
    return triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages)


def _candidates(kernel: str) -> list[KernelConfig]:
    shapes = sorted({s for listed in CANDIDATES[kernel].values() for s in listed})
    loads = (True, False) if kernel in ("forward", "decode") else (False,)
    return [KernelConfig(*s, use_tma=tma) for s in shapes for tma in loads]


def _pruner(kernel: str):
    """Keep the candidates listed for the call's padded head dim and element size that fit on chip;
    descriptor loads only where TMA_MODE allows them (forward: 0 never, 1 allowed, 2 required)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d, element_size = args["BLOCK_D"], args["Q"].element_size()
        listed = CANDIDATES[kernel][(min(d for d, _ in CANDIDATES[kernel] if d >= block_d), element_size)]
        tma_mode = args.get("TMA_MODE", 0)
        tma_wanted = {0: (False,), 1: (False, True), 2: (True,)}[tma_mode]
        kept = []
        for config in configs:
            c = _kernel_config(config)
            if c[:4] in listed and bool(c.use_tma) in tma_wanted and fits(kernel, c, block_d, element_size):
                kept.append(config)
        return kept

    return prune


# Every kernel is tuned per head dim, length bucket, dot precision and score options; Triton adds
# the dtypes of the tensor arguments to the key itself.
AUTOTUNE_KEY = ["HEAD_DIM", "N_BUCKET", "DOT_PRECISION", "LEFT_LIMIT", "RIGHT_LIMIT", "SOFTCAP", "ALIBI", "DROPOUT"]


# kernel name -> its autotuner, filled as the kernel modules are imported (the benchmark's per-config
# timing reads the candidates and the choices here)
AUTOTUNERS = {}


def autotuned(kernel: str, fn, extra_key=(), accumulates=()):
    """``fn`` (a ``@triton.jit`` kernel) behind the autotuner with the candidates of ``kernel``.

    The autotuner may run a kernel several times. Most kernels write their outputs, which is harmless;
    the tensor arguments named in ``accumulates`` are added to (atomics), and are zeroed before each
    timed run and again before the real one.
    """
    AUTOTUNERS[kernel] = triton.autotune(
        configs=[_triton_config(kernel, c) for c in _candidates(kernel)],
        key=AUTOTUNE_KEY + list(extra_key),
        prune_configs_by={"early_config_prune": _pruner(kernel)},
        reset_to_zero=list(accumulates) or None,
    )(fn)
    return AUTOTUNERS[kernel]


def parse_config(text: str) -> KernelConfig:
    """ "B_r,B_c,warps,stages[,tma][,ws]" -> KernelConfig, e.g. "128,64,4,2,tma" or "128,128,8,2,tma,ws"."""
    parts = [p.strip().lower() for p in text.split(",")]
    flags = set()
    while parts and parts[-1] in ("tma", "ws"):
        flags.add(parts.pop())
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or min(numbers) < 1:
        raise ValueError(f"a launch configuration is 'B_r,B_c,warps,stages' with optional ',tma' and ',ws', "
                         f"got {text!r}")
    return KernelConfig(*numbers, use_tma="tma" in flags, warp_specialize="ws" in flags)


def pinned(kernel: str, config: Optional[KernelConfig] = None) -> Optional[KernelConfig]:
    """The configuration ``kernel`` runs without autotuning: ``config`` if given, else the one in
    FLASHCOURSE_CONFIG_<KERNEL>, else the interpreter's; None means: let the autotuner choose."""
    if config is not None:
        return KernelConfig(*config)
    text = os.environ.get(f"FLASHCOURSE_CONFIG_{kernel.upper()}")
    if text:
        return parse_config(text)
    return INTERPRET_CONFIGS.get(kernel) if INTERPRET else None


def first_candidate(kernel: str, fn, tuned, args: tuple, meta: dict) -> KernelConfig:
    """The first of the autotuner's candidates for this call (FLASHCOURSE_AUTOTUNE=first: one compile
    and no timing per key, as the test suite runs on a GPU)."""
    named = dict(zip(fn.arg_names, args)) | meta
    return _kernel_config(_pruner(kernel)(tuned.configs, named)[0])


def launch(kernel: str, fn, tuned, grid, args: tuple, meta: dict, config: Optional[KernelConfig]):
    """Run ``kernel``: the pinned configuration (``pinned``) through the plain ``fn``, else ``tuned``.

    ``grid(block_m, block_n)`` gives the launch grid of a configuration; ``meta`` the other
    compile-time arguments. Returns the configuration used (None when the autotuner chose).
    """
    chosen = pinned(kernel, config)
    if chosen is None and os.environ.get("FLASHCOURSE_AUTOTUNE") == "first":
        chosen = first_candidate(kernel, fn, tuned, args, meta)
    with quiet_interpreter():
        if chosen is None:
            tuned[lambda META: grid(META["BLOCK_M"], META["BLOCK_N"])](*args, **meta)
        else:
            launch_meta = _triton_config(kernel, chosen).all_kwargs()
            fn[grid(chosen.block_m, chosen.block_n)](*args, **meta, **launch_meta)
    return chosen
