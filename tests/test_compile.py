"""flash_attention is a pair of PyTorch custom ops: torch.compile traces it whole (no graph break)."""

import pytest
import torch
import torch._inductor.config

import flashcourse
from flashcourse import flash_attention, flash_attn_func
from tests.helpers import make_qkv, rel_err

DEVICE = "cuda" if flashcourse.HAS_CUDA and not flashcourse.INTERPRET else "cpu"


def attention_block(q, k, v):
    """Some PyTorch around the op, so that the compiled graph holds more than the custom op."""
    return flash_attention(q * 2.0, k, v, causal=True).relu().sum(dim=-1)


@pytest.mark.parametrize("backend", [
    # aot_eager: Dynamo and AOTAutograd trace with the fake kernels (what fullgraph tests)
    "aot_eager",
    # inductor, torch.compile's default, also generates code around the op (a C++ build on a CPU)
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_compiled_forward_and_backward_match_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(attention_block, fullgraph=True, backend=backend)
    q, k, v = make_qkv(B=1, H=2, Hkv=1, Nq=18, Nk=24, d=16, dtype=torch.float32, seed=4)
    inputs = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    eager = attention_block(*inputs)
    out = compiled(*inputs)
    assert rel_err(out, eager) < 1e-6
    grads_eager = torch.autograd.grad(eager.sum(), inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    for g, ge in zip(grads, grads_eager):
        assert g.shape == ge.shape and rel_err(g, ge) < 1e-6


def test_fake_kernel_gives_the_real_shapes():
    """register_fake must describe the real outputs: shapes, dtypes and strides (contiguous)."""
    q, k, v = (t.to(DEVICE) for t in make_qkv(B=2, H=2, Hkv=1, Nq=5, Nk=7, d=16, dtype=torch.float16, seed=1))
    real = torch.ops.flashcourse.flash_attn_fwd(q, k, v, True, 0.25)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.flashcourse.flash_attn_fwd(*(mode.from_tensor(t) for t in (q, k, v)), True, 0.25)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
    torch.library.opcheck(torch.ops.flashcourse.flash_attn_fwd, (q, k, v, True, 0.25))


def options_block(q, k, v, slopes):
    """flash-attn's options through both entry points, dropout included."""
    o = flash_attention(q, k, v, causal=True, window_size=(6, 0), softcap=3.0, alibi_slopes=slopes, dropout_p=0.2)
    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.1,
                                  window_size=(4, 9), softcap=2.0, alibi_slopes=slopes, return_attn_probs=True)
    return o.sum(dim=-1) + out.transpose(1, 2).sum(dim=-1) + lse.clamp(max=0.0)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_options_match_eager(backend):
    """Windows, soft-capping, ALiBi and dropout compile without a graph break; with the same
    torch.manual_seed the compiled dropout draws the same mask as eager (forward and backward)."""
    torch._dynamo.reset()
    compiled = torch.compile(options_block, fullgraph=True, backend=backend)
    q, k, v = make_qkv(B=1, H=2, Hkv=1, Nq=18, Nk=24, d=16, dtype=torch.float32, seed=6)
    inputs = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    slopes = torch.tensor([0.1, 0.3], device=DEVICE)
    torch.manual_seed(0)
    eager = options_block(*inputs, slopes)
    grads_eager = torch.autograd.grad(eager.sum(), inputs)
    # inductor draws random numbers with its own generator unless told to fall back to PyTorch's
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(0)
        out = compiled(*inputs, slopes)
        grads = torch.autograd.grad(out.sum(), inputs)
    assert rel_err(out, eager) < 1e-6
    for g, ge in zip(grads, grads_eager):
        assert rel_err(g, ge) < 1e-6
