"""Launch configurations of the forward kernel: block sizes B_r × B_c, warps and pipeline depth.

In the CPU interpreter every program runs as Python over NumPy, so small fixed blocks keep the tests
fast. On a GPU, ``triton.autotune`` times a few Hopper configurations once per key (head dim, causal,
a bucket of the sequence length and the dtypes of the tensors, which Triton adds to the key itself)
and reuses the fastest for every later call with the same key. See benchmarks/NOTES_forward.md.
"""

import triton

# Interpreter blocks: B_r != B_c on purpose, so that the CPU tests cross the causal diagonal with
# several key blocks per query block, as the GPU configurations do.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 16


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Shared memory of one program: Q_i, plus num_stages buffers of K_j and V_j (what Triton allocates).
SHARED_MEMORY_BYTES = 232448  # the per-block limit of an H100


def shared_bytes(config: triton.Config, block_d: int, element_size: int) -> int:
    kw = config.kwargs
    return element_size * block_d * (kw["BLOCK_M"] + config.num_stages * 2 * kw["BLOCK_N"])


# (B_r, B_c, num_warps, num_stages) per (padded head dim, bytes per element). B_r = 128 rows fill the
# 4-warp groups of Hopper's wgmma; larger d or 4-byte elements leave room for fewer or smaller stages.
HOPPER_CONFIGS = {
    (64, 2): [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(128, 64, 4, 4), _config(128, 128, 4, 3)],
    (128, 2): [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(128, 64, 8, 3), _config(128, 128, 8, 2)],
    (256, 2): [_config(64, 64, 4, 2), _config(128, 64, 8, 2), _config(64, 32, 4, 3)],
    (64, 4): [_config(128, 64, 8, 3), _config(64, 64, 4, 3)],
    (128, 4): [_config(64, 64, 4, 2), _config(128, 32, 8, 3)],
    (256, 4): [_config(64, 32, 4, 2), _config(32, 32, 4, 2)],
}


def gpu_configs() -> list[triton.Config]:
    """Every candidate; ``prune_configs`` keeps those meant for the call's head dim and dtype."""
    return [c for configs in HOPPER_CONFIGS.values() for c in configs]


def prune_configs(configs, named_args, **kwargs):
    """Keep the configurations listed for the call's padded head dim and element size that fit."""
    args = {**named_args, **kwargs}
    block_d, element_size = args["BLOCK_D"], args["Q"].element_size()
    wanted = HOPPER_CONFIGS[(min(d for d, _ in HOPPER_CONFIGS if d >= block_d), element_size)]
    kept = [c for c in configs if any(c is w for w in wanted)]
    return [c for c in kept if shared_bytes(c, block_d, element_size) <= SHARED_MEMORY_BYTES] or kept[-1:]


def length_bucket(n: int) -> int:
    """The autotuning key for a sequence length: its next power of two, at least 128, at most 16384."""
    return min(max(triton.next_power_of_2(n), 128), 16384)
