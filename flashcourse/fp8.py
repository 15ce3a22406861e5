"""FP8 attention, the host side: q, k, v quantized to e4m3 with scales, FlashAttention-3's incoherent
processing, V's layout for the FP8 P·V product, the accuracy reference, and where FP8 can run.

**The format.** ``torch.float8_e4m3fn`` has 1 sign, 4 exponent and 3 mantissa bits: the largest value
is 448, the smallest normal 2⁻⁶, the smallest subnormal 2⁻⁹, and there is no inf. Rounding to nearest
costs a relative error of at most 2⁻⁴ (6 %) for a normal number. Hopper's tensor cores multiply e4m3
tiles at twice the fp16 rate (about 1979 against 989 dense TFLOP/s on an H100 SXM).

**Scales.** A tensor x is stored as x₈ = round(x / δ) with the descale factor δ = amax|x| / 448 of its
group, so that x ≈ δ · x₈ and the group's largest value lands on 448, the top of the range. A group
is the whole tensor (``scaling="tensor"``) or a block of ``SCALE_BLOCK`` = 128 rows (tokens) of one
(batch, head) (``scaling="block"``). The descale factors of every tensor are float32 arrays
(B, H, ⌈N / 128⌉), one number per block of rows (per-tensor scales are one number, expanded). The
kernel multiplies them back in float32, where it is free:
    S_ij = scale · δ_q(i) · δ_k(j) · Q₈_i K₈_jᵀ      one scalar per tile, folded into the softmax's scale;
    O_i = Σ_j δ_v(j) · P_ij V₈_j                  δ_v(j) joins the rescale factor α of the running sum.
Tiles of B_r, B_c ≤ 128 rows that divide 128 each lie inside one block, so each reads one number.

**Incoherent processing** (FlashAttention-3). The rounding error of a dot product q · k with a relative
error ε per element is about ε · ‖q ∘ k‖₂: it is largest when a few channels (outliers, common in
LLM activations) carry most of q ∘ k. A random orthogonal R = diag(σ) · H_d / √d (random signs σ = ±1
times a normalised Hadamard matrix of size d) spreads every channel over all d: q ↦ q R and k ↦ k R
leave q · kᵀ unchanged in exact arithmetic (R Rᵀ = I) while ‖qR ∘ kR‖₂ drops towards ‖q‖ ‖k‖ / √d.
V is not rotated (O = P V would come out rotated).

**V's layout.** Hopper's FP8 ``wgmma`` reads both operands from shared memory *K-major*: the reduction
axis (K of an M × K times K × N product) must be the contiguous one (16-bit operands may be either way;
8-bit ones only K-major). For S = Q Kᵀ the reduction runs over d, which is contiguous in q and k as
stored (N, d). For O = P V it runs over the keys, but V stored (N, d) has d contiguous: ``keys_contiguous``
stores V as (d, N) in memory — Vᵀ, the key axis contiguous — and returns it as a (B, Hkv, N, d) view
(strides (…, 1, N')), so the kernel loads Vᵀ_j tiles and hands ``tl.trans(Vᵀ_j)`` to ``tl.dot`` without
a transposition on chip. The rows of Vᵀ are padded to N' = a multiple of 16 keys, 16 bytes, which
tensor-descriptor (TMA) loads need.

**Where it runs.** FP8 tensor cores exist from compute capability 8.9 (Ada) and 9.0 (Hopper);
``check_fp8_device`` refuses every other device, the CPU interpreter included, with what to do instead.
The price in accuracy can be studied anywhere: ``reference_attention`` is attention in float32 on the
dequantized tensors, the yardstick of the kernel's error.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._checks import check_attention_inputs, check_flag, softmax_scale
from ._env import INTERPRET
from .bench.check import rel_err
from .reference import naive_attention

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
SCALE_BLOCK = 128  # rows (tokens) of one (batch, head) that share a scale with scaling="block"
SCALINGS = ("tensor", "block")
# the oldest GPUs with FP8 tensor cores: Ada (sm_89); Hopper is 9.0
FP8_CAPABILITY = (8, 9)


class FP8Inputs(NamedTuple):
    """q, k, v in e4m3 and their descale factors, as the FP8 forward kernel reads them.

    q: (B, H, Nq, d); k: (B, Hkv, Nk, d); v: (B, Hkv, Nk, d) with the key axis contiguous
    (``keys_contiguous``). q_descale: float32 (B, H, ⌈Nq / 128⌉); k_descale, v_descale:
    (B, Hkv, ⌈Nk / 128⌉); x ≈ descale · x₈ for each block of 128 rows (``dequantize``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor


def check_scaling(scaling) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling must be 'tensor' (one scale per tensor) or 'block' (one per "
                         f"{SCALE_BLOCK} rows of each head), got {scaling!r}")
    return scaling


def _blocks(n: int) -> int:
    return -(-n // SCALE_BLOCK)


def per_row(descale: torch.Tensor, n: int) -> torch.Tensor:
    """The (B, H, ⌈n / 128⌉) descale factors repeated for each of the n rows: (B, H, n, 1)."""
    return descale.repeat_interleave(SCALE_BLOCK, dim=-1)[..., :n, None]


def quantize(x: torch.Tensor, scaling: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, N, d) -> (x₈ in e4m3, descale float32 (B, H, ⌈N / 128⌉)), x ≈ descale · x₈ per row block.

    descale = amax|x| / 448 over the whole tensor (``scaling="tensor"``, one number expanded) or over
    each block of 128 rows of one (batch, head) (``"block"``); 1 for a group of zeros. NaN stays NaN.
    """
    check_scaling(scaling)
    B, H, N, d = x.shape
    x32 = x.float()
    if scaling == "tensor":
        amax = x32.abs().amax().reshape(1, 1, 1).expand(B, H, _blocks(N))
    else:
        # pad the rows to whole blocks of 128 (zeros change no maximum), one maximum per block
        padded = F.pad(x32.abs(), (0, 0, 0, _blocks(N) * SCALE_BLOCK - N))
        amax = padded.view(B, H, _blocks(N), SCALE_BLOCK * d).amax(dim=-1)
    # δ = amax / 448: the largest |x| of the group becomes 448, the top of e4m3's range
    descale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    # x₈ = round(x / δ), kept inside ±448 (the division may land a hair above it)
    x8 = (x32 / per_row(descale, N)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8, descale


def dequantize(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """δ · x₈ in ``dtype``: x8 (B, H, N, d) e4m3, descale (B, H, ⌈N / 128⌉)."""
    return x8.to(dtype) * per_row(descale, x8.shape[2]).to(dtype)


def hadamard_rotation(d: int, seed: int = 0, device=None) -> torch.Tensor:
    """R = diag(σ) · H_d / √d, float32 (d, d): random signs σ = ±1 (from ``seed``) times Sylvester's
    Hadamard matrix, normalised. Orthogonal (R Rᵀ = I), every entry ±1/√d. d must be a power of two."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a head dim d that is a power of two (H_d exists for "
                         f"d = 1, 2, 4, ..., 256), got d = {d}: use rotate=False for this head dim")
    # Sylvester: H_1 = [1], H_2n = [[H_n, H_n], [H_n, −H_n]]
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    rotation = signs[:, None] * h / math.sqrt(d)
    return rotation if device is None else rotation.to(device)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x R in float32: x (..., d), R (d, d). Applied to both q and k it leaves q · kᵀ unchanged."""
    return x.float() @ rotation


def keys_contiguous(v: torch.Tensor) -> torch.Tensor:
    """v (B, Hkv, N, d) as a view of the same shape whose key axis is contiguous: Vᵀ in memory.

    The memory is (B, Hkv, d, N') with N' the keys rounded up to a multiple of 16 (16-byte rows for
    tensor-descriptor loads), so the view's strides are (Hkv · d · N', d · N', 1, N'). A v that is
    already laid out so is returned as it is.
    """
    B, Hkv, N, d = v.shape
    if v.stride(-2) == 1 and v.stride(-1) * v.element_size() % 16 == 0:
        return v
    padded = -(-N // 16) * 16
    vt = torch.empty((B, Hkv, d, padded), dtype=v.dtype, device=v.device)[..., :N]
    vt.copy_(v.transpose(-1, -2))
    return vt.transpose(-1, -2)


def quantize_attention_inputs(q, k, v, *, scaling: str = "block", rotate_qk: bool = False,
                              seed: int = 0) -> FP8Inputs:
    """q (B, H, Nq, d), k, v (B, Hkv, Nk, d) of any float dtype -> ``FP8Inputs`` for the FP8 kernel.

    ``rotate_qk`` applies the Hadamard rotation ``hadamard_rotation(d, seed)`` to q and k before they
    are quantized (d a power of two); v is never rotated. v comes back with its key axis contiguous.
    """
    if rotate_qk:
        rotation = hadamard_rotation(q.shape[-1], seed, q.device)
        q, k = rotate(q, rotation), rotate(k, rotation)
    (q8, qd), (k8, kd), (v8, vd) = (quantize(t, scaling) for t in (q, k, v))
    return FP8Inputs(q8, k8, keys_contiguous(v8), qd, kd, vd)


def dequantized(inputs: FP8Inputs, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(q, k, v) of ``FP8Inputs`` back in ``dtype``: what the FP8 kernel computes with."""
    return (dequantize(inputs.q, inputs.q_descale, dtype), dequantize(inputs.k, inputs.k_descale, dtype),
            dequantize(inputs.v, inputs.v_descale, dtype))


def reference_attention(inputs: FP8Inputs, *, causal: bool = False, scale: Optional[float] = None,
                        dtype: torch.dtype = torch.float32, return_lse: bool = False):
    """The accuracy reference of the FP8 forward: attention computed in ``dtype`` (float32, or float64)
    on the dequantized q, k, v, by ``flashcourse.naive_attention``. The FP8 kernel's error against
    float64 attention on the unquantized inputs should be at most twice this one's (issue 19).

    A rotated q, k gives the same scores as the unrotated ones (up to rounding), so no rotation is undone.
    """
    q, k, v = dequantized(inputs, dtype)
    return naive_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def check_fp8_device(device) -> None:
    """Refuse FP8 attention where there are no FP8 tensor cores: the CPU interpreter, and GPUs of
    compute capability below 8.9 (Ada; Hopper is 9.0). Says what to do instead."""
    device = torch.device(device)
    fallback = ("Use fp8=False with bfloat16 or float16 inputs, or run on a GPU with FP8 tensor cores (an H100 or "
                "H200, compute capability 9.0; Ada cards such as the L4 and L40 are 8.9). The accuracy FP8 "
                "costs can be studied on any machine with flashcourse.fp8.reference_attention.")
    if INTERPRET or device.type != "cuda":
        where = ("Triton's CPU interpreter runs this machine's kernels" if INTERPRET
                 else f"the tensors are on {device}")
        raise RuntimeError(f"FP8 attention needs FP8 tensor cores, and {where}: there are none. {fallback}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_CAPABILITY:
        raise RuntimeError(
            f"FP8 attention needs FP8 tensor cores, which NVIDIA GPUs have from compute capability "
            f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}; this GPU, {torch.cuda.get_device_name(device)}, is "
            f"{major}.{minor}. {fallback}"
        )


# ----------------------------------------------------------------------------------------------
# The FP8 forward: flash_attention(..., fp8=True), or inputs already in e4m3 with their descale factors


def _descale_blocks(name: str, t, B: int, H: int, N: int, device) -> torch.Tensor:
    """A descale factor given per tensor (one number), per head (B, H) or per block of 128 rows
    (B, H, ⌈N / 128⌉), as the kernel reads it: contiguous float32 (B, H, ⌈N / 128⌉) on ``device``."""
    want = (f"{name} must be a float tensor: one number (per tensor), (B, H) = {(B, H)} (per head) or "
            f"(B, H, ⌈N / {SCALE_BLOCK}⌉) = {(B, H, _blocks(N))} (per block of {SCALE_BLOCK} rows)")
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{want}, got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    shaped = t.reshape(1, 1, 1) if t.numel() == 1 else t[..., None] if t.dim() == 2 else t
    try:
        return torch.broadcast_to(shaped.to(device=device, dtype=torch.float32), (B, H, _blocks(N))).contiguous()
    except RuntimeError:
        raise ValueError(f"{want}, got shape {tuple(t.shape)}") from None


def _quantized_shapes(q, k, v):
    """The sizes (B, H, Hkv, Nq, Nk, d) of inputs already in e4m3, checked as every attention input is."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype != E4M3:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"q is in torch.float8_e4m3fn, so k and v must be too (inputs already quantized, "
                            f"e.g. by flashcourse.fp8.quantize); {name} is {got}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all three to one device")
    # the shape rules of every attention call, checked on shape-only copies
    return check_attention_inputs(*(torch.empty(t.shape, device="meta") for t in (q, k, v)))


def attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
              scaling: str = "block", rotate: bool = False, descale=None):
    """The FP8 forward of ``flashcourse.flash_attention(..., fp8=True)``: O (B, H, Nq, d), and L with
    ``return_lse``. Forward only.

    q (B, H, Nq, d), k, v (B, Hkv, Nk, d) in float16, bfloat16 or float32 are quantized here
    (``quantize_attention_inputs`` with ``scaling`` and, if ``rotate``, the Hadamard rotation of q and
    k), and O comes back in q's dtype. Or q, k, v are already ``torch.float8_e4m3fn`` and ``descale``
    = (q_descale, k_descale, v_descale) gives their factors, each one number, (B, H) per head, or per
    block of 128 rows (``quantize``); O is then bfloat16. Needs FP8 tensor cores (``check_fp8_device``).
    """
    from .kernels.forward import MAX_HEAD_DIM, attention_forward  # here: this module runs without Triton

    prequantized = isinstance(q, torch.Tensor) and q.dtype == E4M3
    if prequantized:
        B, H, Hkv, Nq, Nk, d = _quantized_shapes(q, k, v)
        if check_flag("rotate", rotate):
            raise ValueError("rotate=True rotates q and k before they are quantized; these are quantized already: "
                             "rotate them before quantizing (flashcourse.fp8.quantize_attention_inputs)")
        if not isinstance(descale, (tuple, list)) or len(descale) != 3:
            raise TypeError("inputs already in torch.float8_e4m3fn need descale = (q_descale, k_descale, v_descale), "
                            "the factors that multiply them back (x ≈ descale · x₈; flashcourse.fp8.quantize)")
        descale = [_descale_blocks(name, t, B, h, n, q.device)
                   for name, t, h, n in zip(("q_descale", "k_descale", "v_descale"), descale, (H, Hkv, Hkv),
                                            (Nq, Nk, Nk))]
        out_dtype = torch.bfloat16
    else:
        B, H, Hkv, Nq, Nk, d = check_attention_inputs(q, k, v)
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"fp8=True quantizes float16, bfloat16 or float32 inputs, got {q.dtype}")
        if descale is not None:
            raise ValueError("descale is for inputs already in torch.float8_e4m3fn; with fp8=True the inputs are "
                             "quantized here and their factors computed")
        check_scaling(scaling)
        if check_flag("rotate", rotate):
            hadamard_rotation(d)  # refuses a d that is not a power of two
        out_dtype = q.dtype
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim d = {d} is too large for the Triton kernels (d <= {MAX_HEAD_DIM})")
    check_fp8_device(q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("the FP8 forward has no backward pass (FP8 is for inference here): call it under "
                           "torch.no_grad() or on tensors that do not require grad, or train with fp8=False")
    causal = check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = softmax_scale(scale, d)
    if prequantized:
        inputs = FP8Inputs(q, k, keys_contiguous(v), *descale)
    else:
        inputs = quantize_attention_inputs(q, k, v, scaling=scaling, rotate_qk=rotate)
    o, lse = attention_forward(inputs.q, inputs.k, inputs.v, causal=causal, scale=scale, descale=inputs[3:],
                               out_dtype=out_dtype)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------
# The accuracy price, measured: random inputs with outlier channels, and the reference's error


def outlier_inputs(B: int = 1, H: int = 2, N: int = 256, d: int = 64, *, channels: int = 4, factor: float = 20.0,
                   seed: int = 0, device=None, dtype: torch.dtype = torch.float32):
    """Random q, k, v (B, H, N, d) ~ N(0, 1) in which ``channels`` channels of q and k (the same ones)
    are ``factor`` times larger, as in the activations of large language models. Drawn on the CPU
    in float64 (a seed gives the same numbers on every device), returned in ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    outliers = torch.randperm(d, generator=g)[:channels]
    q[..., outliers] *= factor
    k[..., outliers] *= factor
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def reference_errors(q, k, v, *, causal: bool = False, settings=None) -> list[dict]:
    """The error that quantizing q, k, v to e4m3 costs, for each (scaling, rotate) of ``settings``
    (default: per-tensor and per-block scales, with and without the rotation), and for bfloat16
    inputs as a yardstick: rows {"inputs", "scaling", "rotate", "error"}, the error being
    ``rel_err`` (‖o − ref‖ / ‖ref‖) of attention in float32 on the rounded inputs against float64 attention on
    the exact ones. On a CPU at N = 256 it takes a fraction of a second."""
    settings = settings or [(s, r) for s in SCALINGS for r in (False, True)]
    exact = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    rounded = [t.to(torch.bfloat16).float() for t in (q, k, v)]
    rows = [dict(inputs="bfloat16", scaling=None, rotate=False,
                 error=rel_err(naive_attention(*rounded, causal=causal), exact))]
    for scaling, rotate_qk in settings:
        inputs = quantize_attention_inputs(q, k, v, scaling=scaling, rotate_qk=rotate_qk)
        rows.append(dict(inputs="e4m3", scaling=scaling, rotate=rotate_qk,
                         error=rel_err(reference_attention(inputs, causal=causal), exact)))
    return rows
