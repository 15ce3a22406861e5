"""Launch configurations of the forward kernel: block sizes B_r × B_c, warps, pipeline depth, loads.

In the CPU interpreter every program runs as Python over NumPy, so small fixed blocks keep the tests
fast. On a GPU, ``triton.autotune`` times a few Hopper configurations once per key (head dim, causal,
whether tensor descriptors may be used, a bucket of the sequence length, and the dtypes of the
tensors, which Triton adds to the key itself) and reuses the fastest for every later call with the
same key. Measurements behind these choices: benchmarks/NOTES_forward.md.
"""

import torch
import triton

# Interpreter blocks: B_r != B_c on purpose, so that the CPU tests cross the causal diagonal with
# several key blocks per query block, as the GPU configurations do.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 16

# Load K_j and V_j through tensor descriptors (Hopper's copy engine, TMA) where the layout allows.
# Set to False to force masked pointer loads everywhere (the tests and the benchmark compare both).
USE_TENSOR_DESCRIPTORS = True


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """A descriptor needs the last stride 1 and every other stride, and the start, 16-byte aligned."""
    return USE_TENSOR_DESCRIPTORS and all(
        t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
        for t in tensors
    )


# Shared memory of one program: Q_i, plus num_stages buffers of K_j and V_j (what Triton allocates).
SHARED_MEMORY_BYTES = 232448  # the per-block limit of an H100


def shared_bytes(config: triton.Config, block_d: int, element_size: int) -> int:
    kw = config.kwargs
    return element_size * block_d * (kw["BLOCK_M"] + config.num_stages * 2 * kw["BLOCK_N"])


# (B_r, B_c, num_warps, num_stages) per (padded head dim, bytes per element). B_r = 128 rows fill the
# 4-warp groups of Hopper's wgmma; larger d or 4-byte elements leave room for fewer or smaller stages.
# Each shape is tried with descriptor loads and with pointer loads: on the H100, descriptors won at
# d = 64 with N >= 4096 and with the two-programs-per-SM shape (128, 64, 4, 2) at d = 128, pointers
# mostly at N = 1024 (benchmarks/NOTES_forward.md).
HOPPER_SHAPES = {
    (64, 2): [(128, 64, 4, 3), (128, 128, 4, 3)],
    (128, 2): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2)],
    (256, 2): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    (64, 4): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (128, 4): [(64, 64, 4, 2), (128, 32, 8, 3)],
    (256, 4): [(64, 32, 4, 2), (32, 32, 4, 2)],
}


def _shape(config: triton.Config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def gpu_configs() -> list[triton.Config]:
    """Every candidate; ``prune_configs`` keeps those meant for the call's head dim, dtype and layout."""
    shapes = sorted({s for shapes in HOPPER_SHAPES.values() for s in shapes})
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=st)
        for bm, bn, w, st in shapes
        for tma in (True, False)
    ]


def prune_configs(configs, named_args, **kwargs):
    """Keep the shapes listed for the call's padded head dim and element size that fit in shared
    memory, with descriptor loads only where the layout allows them (TMA_OK)."""
    args = {**named_args, **kwargs}
    block_d, element_size = args["BLOCK_D"], args["Q"].element_size()
    wanted = HOPPER_SHAPES[(min(d for d, _ in HOPPER_SHAPES if d >= block_d), element_size)]
    kept = [c for c in configs if _shape(c) in wanted and (args["TMA_OK"] or not c.kwargs["USE_TMA"])]
    return [c for c in kept if shared_bytes(c, block_d, element_size) <= SHARED_MEMORY_BYTES] or kept[-1:]


def length_bucket(n: int) -> int:
    """The autotuning key for a sequence length: its next power of two, at least 128, at most 16384."""
    return min(max(triton.next_power_of_2(n), 128), 16384)
