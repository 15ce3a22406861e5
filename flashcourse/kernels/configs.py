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


# (B_r, B_c, num_warps, num_stages). B_r = 128 rows fill the 4-warp groups of Hopper's wgmma; the
# shared memory of one stage is (B_c · d) for K_j and V_j each, so larger d gets fewer stages.
HOPPER_CONFIGS = {
    # d <= 64
    64: [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(128, 64, 4, 4), _config(128, 128, 4, 3)],
    # d <= 128
    128: [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(128, 64, 8, 3), _config(128, 128, 8, 2)],
    # d <= 256
    256: [_config(64, 64, 4, 2), _config(128, 64, 8, 2), _config(64, 32, 4, 3)],
}


def gpu_configs() -> list[triton.Config]:
    """Every candidate; ``prune_configs`` keeps those meant for the call's head dim and dtype."""
    return [c for configs in HOPPER_CONFIGS.values() for c in configs]


def prune_configs(configs, named_args, **kwargs):
    """Keep the configurations of the call's padded head dim; float32 (4-byte) tiles get B_c <= 64."""
    args = {**named_args, **kwargs}
    block_d = args["BLOCK_D"]
    wanted = HOPPER_CONFIGS[min(k for k in HOPPER_CONFIGS if k >= block_d)]
    kept = [c for c in configs if any(c is w for w in wanted)]
    if args["Q"].element_size() == 4:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 64] or kept[:1]
    return kept


def length_bucket(n: int) -> int:
    """The autotuning key for a sequence length: its next power of two, at least 128, at most 16384."""
    return min(max(triton.next_power_of_2(n), 128), 16384)
