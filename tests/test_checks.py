"""Bad input gets a clear error that names the argument, what it got and what it wanted.

The attention entry points here are the PyTorch ones (naive, tiled) and the ``causal_mask``,
``safe_softmax``, ``online_softmax`` and device helpers; every test runs on the ``device`` fixture.
"""

import pytest
import torch

import flashcourse._env as env
from flashcourse import causal_mask, naive_attention, naive_attention_backward, online_softmax, safe_softmax, tiled_attention
from flashcourse._env import resolve_device
from flashcourse.softmax import empty_state
from flashcourse.tiled import tiled_attention_backward, tiled_attention_forward
from helpers import make_qkv, sdpa_reference

ENTRY_POINTS = [naive_attention, tiled_attention]


def qkv(device="cpu", **kw):
    return make_qkv(B=2, H=4, Hkv=2, Nq=8, Nk=8, d=16, dtype=torch.float32, device=device, **kw)


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
    ("mixed devices", lambda q, k, v: (q, k.to("meta"), v), ValueError, ["k is on meta", "q is on {device}"]),
    ("empty sequence", lambda q, k, v: (q[:, :, :0], k, v), ValueError, ["q has an empty dimension", "(2, 4, 0, 16)"]),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("what,build,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_explained(fn, what, build, exc, words, device):
    with pytest.raises(exc) as info:
        fn(*build(*qkv(device)))
    for w in words:
        w = w.format(device=torch.empty(0, device=device).device)
        assert w in str(info.value), f"{what}: {w!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bad_scale(fn, scale, device):
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        fn(*qkv(device), scale=scale)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_a_scale_that_is_not_a_number_is_named(fn, device):
    with pytest.raises(TypeError, match="scale must be a number.*'a'"):
        fn(*qkv(device), scale="a")


def _backward(fn):
    """naive/tiled backward with the flag under test: (q, k, v, **flags) -> gradients."""
    def call(q, k, v, **flags):
        o, lse = naive_attention(q, k, v, return_lse=True)
        if fn is naive_attention_backward:
            return fn(q, k, v, o, o, **flags)
        return fn(q, k, v, o, lse, o, **flags)
    return call


FLAGGED = [  # every public function with a yes/no option, and the option
    (naive_attention, "causal"), (naive_attention, "return_lse"), (tiled_attention, "causal"),
    (tiled_attention, "return_lse"), (tiled_attention_forward, "causal"),
    (_backward(naive_attention_backward), "causal"), (_backward(tiled_attention_backward), "causal"),
]


@pytest.mark.parametrize("fn,flag", FLAGGED, ids=[f"{getattr(f, '__name__', 'backward')}-{x}" for f, x in FLAGGED])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flags_must_be_bools(fn, flag, value, device):
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got {value!r}"):
        fn(*qkv(device), **{flag: value})


@pytest.mark.parametrize("block", [0, -4, 2.5, True])
def test_bad_block_size(block):
    with pytest.raises(ValueError, match="block_m must be a positive int"):
        tiled_attention(*qkv(), block_m=block)


@pytest.mark.parametrize("Nq,Nk,exc,words", [
    (-1, 4, ValueError, "Nq must be >= 1"), (0, 4, ValueError, "Nq must be >= 1"), (4, 0, ValueError, "Nk must be >= 1"),
    (2.5, 4, TypeError, "Nq must be an int.*2.5"), (4, "4", TypeError, "Nk must be an int"),
    (True, 4, TypeError, "Nq must be an int"),
])
def test_causal_mask_wants_positive_int_lengths(Nq, Nk, exc, words):
    with pytest.raises(exc, match=words):
        causal_mask(Nq, Nk)


def test_causal_mask_on_the_device(device):
    mask = causal_mask(2, 4, device=device)
    assert mask.device.type == device and mask.tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("fn", [safe_softmax, online_softmax], ids=lambda f: f.__name__)
def test_softmax_wants_a_float_tensor(fn):
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor.*got list; make one with torch.tensor\(x\)"):
        fn([1.0, 2.0])
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor.*torch.int64.*x.float\(\)"):
        fn(torch.tensor([1, 2]))


@pytest.mark.parametrize("block", [0, 2.5])
def test_online_softmax_block(block):
    with pytest.raises(ValueError, match="block must be a positive int"):
        online_softmax(torch.zeros(3), block=block)


# ---- devices: one policy, flashcourse._env.resolve_device ----

def test_default_device_is_the_gpu_when_there_is_one(device):
    assert resolve_device(None) == torch.device(device)
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("use", [
    lambda: resolve_device("cuda"),
    lambda: causal_mask(2, 3, device="cuda"),
    lambda: causal_mask(2, 3, device=torch.device("cuda", 0)),
    lambda: empty_state((2,), device="cuda"),
], ids=["resolve_device", "causal_mask", "causal_mask-torch.device", "empty_state"])
def test_a_cuda_device_on_a_cpu_only_torch_is_explained(monkeypatch, use):
    monkeypatch.setattr(env, "CUDA_BUILT", False)
    monkeypatch.setattr(env, "HAS_CUDA", False)
    with pytest.raises(ValueError, match=r"this PyTorch .* is a CPU-only build.*install the CUDA build \(README"
                                         r".*or use device='cpu'"):
        use()


def test_a_cuda_device_without_a_gpu_is_explained(monkeypatch):
    monkeypatch.setattr(env, "CUDA_BUILT", True)
    monkeypatch.setattr(env, "HAS_CUDA", False)
    with pytest.raises(ValueError, match=r"sees no CUDA GPU.*nvidia-smi.*device='cpu'"):
        resolve_device("cuda:0")


def test_a_device_that_is_not_one_is_explained():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs the CPU-only build of PyTorch (CI's)")
def test_the_cpu_only_build_is_recognised():
    with pytest.raises(ValueError, match="CPU-only build"):
        causal_mask(2, 3, device="cuda")


# ---- non-finite inputs propagate as in SDPA ----

def test_an_inf_in_k_makes_the_rows_that_reach_it_nan_as_sdpa_does(device):
    q, k, v = make_qkv(B=1, H=2, Nq=40, Nk=70, d=8, device=device)
    # key 5 scores +inf against queries with q[..., 0] > 0 and −inf (weight 0) against the others
    k[:, :, 5] = 0.0
    k[:, :, 5, 0] = float("inf")
    nan_rows = q[..., 0] > 0
    want = sdpa_reference(q, k, v)
    assert torch.equal(torch.isnan(want).any(-1), nan_rows)  # what SDPA does
    for O in (naive_attention(q, k, v), tiled_attention(q, k, v, block_m=16, block_n=16)):
        assert torch.isnan(O[nan_rows]).all()
        torch.testing.assert_close(O[~nan_rows], want[~nan_rows], atol=1e-12, rtol=1e-12)
    _, L = tiled_attention(q, k, v, return_lse=True)
    assert not torch.isfinite(L[nan_rows]).any() and torch.isfinite(L[~nan_rows]).all()


def test_a_nan_in_q_stays_in_its_row(device):
    q, k, v = make_qkv(B=1, H=1, Nq=9, Nk=33, d=8, device=device)
    q[0, 0, 4, 2] = float("nan")
    for O in (naive_attention(q, k, v, causal=True), tiled_attention(q, k, v, causal=True, block_m=4, block_n=8)):
        assert torch.isnan(O[0, 0, 4]).all()
        assert torch.isfinite(O[0, 0, torch.arange(9, device=device) != 4]).all()
