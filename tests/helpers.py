"""Small shared helpers for the tests: random attention inputs and the SDPA oracle."""

import torch
import torch.nn.functional as F

from flashcourse._checks import causal_mask


def make_qkv(B=2, H=4, Hkv=None, Nq=17, Nk=None, d=16, dtype=torch.float64, seed=0, scale_logits=1.0, device="cpu"):
    """Random q (B, H, Nq, d), k and v (B, Hkv, Nk, d); ``scale_logits`` multiplies q to make large logits.

    The numbers are drawn on the CPU, so a seed gives the same inputs on every ``device``.
    """
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    Nk = Nq if Nk is None else Nk
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64) * scale_logits
    k = torch.randn(B, Hkv, Nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, d, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def sdpa_reference(q, k, v, causal=False, scale=None):
    """PyTorch SDPA in float64 (on the inputs' device) with an explicit bottom-right causal mask; rows with no key set to 0."""
    q, k, v = q.double(), k.double(), v.double()
    mask = causal_mask(q.shape[2], k.shape[2], device=q.device) if causal else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return torch.nan_to_num(o, nan=0.0) if causal else o


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
