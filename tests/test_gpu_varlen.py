"""Variable-length batches on the GPU at flash-attn's test sizes: random padding of each sequence (as
flash-attn's ``generate_random_padding_mask``), every option × causal × heads × lengths × dtype,
forward and backward, with the CPU tests' check (test_flash_varlen.check_varlen: per-sequence
naive_attention, flash-attn's accuracy rule, poisoned rows past the sequences).

Each product test pins one launch configuration per kernel (test_gpu_options.pinned_configs), so that
it compiles each option's kernels once; ``test_gpu_varlen_autotuned`` runs the autotuner.
"""

import pytest
import torch

from flashcourse import flash_attn_varlen_func
from test_flash_varlen import check_varlen, cu_seqlens, packed_inputs
from test_gpu_options import OPTIONS as GPU_OPTIONS, pinned_configs  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu

OPTIONS = {name: GPU_OPTIONS[name] for name in ("window-left", "window-both", "softcap", "alibi-BH", "dropout")}
OPTIONS["none"] = {}
# (longest Nq, longest Nk) of flash-attn's varlen tests
SEQLENS = [(1, 147), (113, 203), (128, 217), (108, 256), (512, 256), (1023, 1024), (2048, 2048)]
HEADS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}


def random_lengths(B: int, Nq: int, Nk: int, seed: int, mode: str = "random"):
    """(Nq_b, Nk_b) per sequence: "random" in [max(1, N − 20), N] (flash-attn's), "third" in [N / 3, N],
    "zeros" with a sequence of no queries and one of no keys."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        low = max(1, n - 20) if mode == "random" else n // 3
        return torch.randint(low, n + 1, (B,), generator=g).tolist()

    lengths = list(zip(draw(Nq), draw(Nk)))
    lengths[0] = (Nq, Nk)  # the longest, as max_seqlen says
    if mode == "zeros":
        lengths[1], lengths[2] = (0, lengths[1][1]), (lengths[2][0], 0)
    return lengths


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_varlen_full_product(option, causal, seqlens, dtype, pinned_configs):  # noqa: F811
    """option × causal × lengths × dtype; the heads (mha, gqa, mqa) change with the lengths."""
    H, Hkv = list(HEADS.values())[SEQLENS.index(seqlens) % len(HEADS)]
    lengths = random_lengths(4, *seqlens, seed=sum(seqlens), mode="third" if seqlens[0] > 500 else "random")
    check_varlen("cuda", dtype, lengths, H, Hkv, 64, seed=sum(seqlens), causal=causal, **OPTIONS[option])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_varlen_d128_and_empty_sequences(option, dtype, pinned_configs):  # noqa: F811
    """d = 128, float32 in IEEE precision, and sequences with no queries or no keys."""
    lengths = random_lengths(5, 777, 1000, seed=3, mode="zeros")
    check_varlen("cuda", dtype, lengths, 4, 2, 128, seed=3, causal=True, **OPTIONS[option])


@pytest.mark.autotune
@pytest.mark.parametrize("option", ["window-both", "softcap", "alibi-BH", "dropout", "none"])
def test_gpu_varlen_autotuned(option):
    """The autotuner's candidates on a packed batch (every candidate compiled and timed)."""
    check_varlen("cuda", torch.float16, random_lengths(8, 2048, 2048, seed=5, mode="third"), 8, 2, 128, seed=5,
                 causal=True, **OPTIONS[option])


@pytest.mark.parametrize("page", [256, 512, 16])
def test_gpu_varlen_paged(page):
    """flash-attn's paged sizes (256, 512) and a small page: the output of the packed keys, bitwise."""
    lengths = random_lengths(8, 300, 1500, seed=page)
    H, Hkv, d = 9, 3, 64
    q, k, v, cu_q, cu_k = packed_inputs(lengths, H, Hkv, d, torch.bfloat16, 1, "cuda")
    pages_per_seq = -(-1500 // page)
    table = torch.randperm(8 * pages_per_seq + 5, device="cuda")[:8 * pages_per_seq].view(8, pages_per_seq)
    k_pages = torch.full((8 * pages_per_seq + 5, page, Hkv, d), float("nan"), dtype=k.dtype, device="cuda")
    v_pages = k_pages.clone()
    for b, (_, n) in enumerate(lengths):
        rows = torch.arange(n, device="cuda")
        k_pages[table[b, rows // page], rows % page] = k[cu_k[b]:cu_k[b + 1]]
        v_pages[table[b, rows // page], rows % page] = v[cu_k[b]:cu_k[b + 1]]
    for causal in (False, True):
        want = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 1500, causal=causal)
        got = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 300, 1500, causal=causal,
                                     block_table=table.int())
        assert torch.equal(got, want)


def test_gpu_varlen_many_sequences():
    """1000 short sequences of random lengths 0 .. 64 in one launch."""
    g = torch.Generator().manual_seed(0)
    lengths = [(int(a), int(b)) for a, b in torch.randint(0, 65, (1000, 2), generator=g)]
    lengths[0] = (64, 64)
    check_varlen("cuda", torch.bfloat16, lengths, 4, 4, 64, seed=0, causal=True)
    assert cu_seqlens([1], "cuda").dtype == torch.int32
