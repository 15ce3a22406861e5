"""Bad input gets a clear error that names the argument, what it got and what it wanted."""

import pytest
import torch

from flashcourse import naive_attention, tiled_attention
from helpers import make_qkv

ENTRY_POINTS = [naive_attention, tiled_attention]


def qkv(**kw):
    return make_qkv(B=2, H=4, Hkv=2, Nq=8, Nk=8, d=16, dtype=torch.float32, **kw)


CASES = [
    # (description, build (q, k, v), exception, words the message must contain)
    ("q has rank 3", lambda q, k, v: (q[0], k, v), ValueError, ["q must have 4 dimensions", "(2, 4, 8, 16)"[4:]]),
    ("k is a list", lambda q, k, v: (q, k.tolist(), v), TypeError, ["k must be a torch.Tensor", "list"]),
    ("integer q", lambda q, k, v: (q.long(), k, v), TypeError, ["q must be a floating-point tensor", "torch.int64"]),
    ("batch mismatch", lambda q, k, v: (q, k[:1], v[:1]), ValueError, ["batch size 1", "q has 2"]),
    ("head dim mismatch", lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, ["head dim 8", "q has 16"]),
    ("v length differs", lambda q, k, v: (q, k, v[:, :, :5]), ValueError, ["v must have the same shape as k", "(2, 2, 8, 16)"]),
    ("H % Hkv", lambda q, k, v: (q[:, :3], k, v), ValueError, ["3 heads", "H % Hkv == 0"]),
    ("mixed dtypes", lambda q, k, v: (q, k.double(), v), TypeError, ["k.dtype is torch.float64", "q.dtype is torch.float32"]),
    ("mixed devices", lambda q, k, v: (q, k.to("meta"), v), ValueError, ["k is on meta", "q is on cpu"]),
    ("empty sequence", lambda q, k, v: (q[:, :, :0], k, v), ValueError, ["q has an empty dimension", "(2, 4, 0, 16)"]),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("what,build,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_explained(fn, what, build, exc, words):
    with pytest.raises(exc) as info:
        fn(*build(*qkv()))
    for w in words:
        assert w in str(info.value), f"{what}: {w!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bad_scale(fn, scale):
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        fn(*qkv(), scale=scale)


@pytest.mark.parametrize("block", [0, -4, 2.5])
def test_bad_block_size(block):
    with pytest.raises(ValueError, match="block_m must be a positive int"):
        tiled_attention(*qkv(), block_m=block)
