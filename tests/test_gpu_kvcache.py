"""flash_attn_with_kvcache on the GPU at flash-attn's test sizes (up to 128k cached keys): the CPU
tests' check (test_flash_kvcache.check_kvcache: a PyTorch model of the cache and naive_attention per
sequence, the caches exactly the model's after the call) over caches × rotary × masks × heads ×
splits, the split heuristic on a real SM count, and the decoding configurations autotuned.

The product pins one configuration per kernel (the decoding one included), as test_gpu_options does.
"""

import pytest
import torch

from flashcourse import flash_attn_with_kvcache
from flashcourse.kernels.forward import attention_forward
from flashcourse.kernels.splitkv import choose_num_splits
from flash_reference import max_error
from test_flash_kvcache import MASKS, check_kvcache
from test_flash_options import pairwise

pytestmark = pytest.mark.gpu

# (Nq, cache length) of flash-attn's kvcache tests
SEQLENS = [(1, 128), (1, 339), (3, 1024), (64, 800), (64, 256), (3, 799), (64, 2048), (16, 20000), (1, 128 * 1024)]


@pytest.fixture
def pinned_configs(monkeypatch):
    for kernel, config in (("FORWARD", "64,64,4,2"), ("DECODE", "16,64,4,2")):
        monkeypatch.setenv(f"FLASHCOURSE_CONFIG_{kernel}", config)


HEADS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
PAIRWISE = pairwise({"seqlens": SEQLENS, "cache": ["plain", "batch_idx", "leftpad", "paged"],
                     "rotary": ["none", "interleaved-half", "neox-full"], "mask": list(MASKS), "num_splits": [1, 0],
                     "heads": list(HEADS), "new": [True, False]})


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gpu_kvcache_pairwise(case, pinned_configs):
    """Every pair of values of the factors at least once; pages of 256 rows (flash-attn's), 16 where the
    cache is not a multiple of 256."""
    (Nq, capacity), H, Hkv = case["seqlens"], *HEADS[case["heads"]]
    check_kvcache("cuda", torch.float16, B=2, Nq=Nq, Nnew=Nq if case["new"] else 0, H=H, Hkv=Hkv, d=128,
                  cache=case["cache"], rotary=case["rotary"], num_splits=case["num_splits"], capacity=capacity,
                  page=256 if capacity % 256 == 0 else 16 if capacity % 16 == 0 else 1, seed=Nq + capacity,
                  **MASKS[case["mask"]])


@pytest.mark.autotune
@pytest.mark.parametrize("heads", [(6, 6), (6, 1), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decoding_autotuned(heads, dtype):
    """One new token per step on 16k cached keys, the decoding candidates autotuned, the heuristic's splits."""
    H, Hkv = heads
    check_kvcache("cuda", dtype, B=3, Nq=1, Nnew=1, H=H, Hkv=Hkv, d=128, capacity=16384, seed=H)


def test_gpu_heuristic_splits_small_batches_and_merges_them():
    """B · Hkv = 8 programs on a GPU of 100+ SMs: split; the split result is the unsplit one."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert choose_num_splits(8, 32768, 128, "cuda") > 1 and choose_num_splits(4 * sms, 32768, 128, "cuda") == 1
    q, k, v = (torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16) for h, n in ((8, 4), (8, 32768),
                                                                                              (8, 32768)))
    one = attention_forward(q, k, v, causal=False, scale=0.1, decode=True, num_splits=1)
    many = attention_forward(q, k, v, causal=False, scale=0.1, decode=True,
                             num_splits=choose_num_splits(8, 32768, 128, "cuda"))
    assert max_error(one[0], many[0]) < 1e-2 and max_error(one[1], many[1]) < 1e-4


def test_gpu_appending_steps_like_generate():
    """64 decoding steps, each appending its token in place: the last step sees all of them."""
    B, H, Hkv, d, steps = 2, 8, 2, 64, 64
    k_cache = torch.zeros(B, 256, Hkv, d, device="cuda", dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    ks = torch.randn(B, steps, Hkv, d, device="cuda", dtype=torch.float16)
    vs = torch.randn_like(ks)
    q = torch.randn(B, 1, H, d, device="cuda", dtype=torch.float16)
    for t in range(steps):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, ks[:, t:t + 1], vs[:, t:t + 1], cache_seqlens=t, causal=True)
    assert torch.equal(k_cache[:, :steps], ks) and (k_cache[:, steps:] == 0).all()
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), ks.transpose(1, 2).float(), vs.transpose(1, 2).float(), enable_gqa=True)
    assert max_error(out, want.transpose(1, 2)) < 2e-3
