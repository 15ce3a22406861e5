"""Input checks shared by every attention implementation in the package.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument, what it
got and what it should be, so that a learner can fix the call without reading a traceback.
"""

import math
import numbers
from typing import NamedTuple, Optional

import torch

from ._env import factory_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Shapes(NamedTuple):
    """The sizes of one attention call: q is (B, H, Nq, d), k and v are (B, Hkv, Nk, d)."""

    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    d: int


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float_tensor(name: str, t, want: str) -> None:
    """A floating-point ``torch.Tensor`` (not a list, not integers); ``want`` describes its shape."""
    if not isinstance(t, torch.Tensor):
        hint = f"; make one with torch.tensor({name})" if isinstance(t, (list, tuple)) else ""
        raise TypeError(f"{name} must be a torch.Tensor of shape {want}, got {type(t).__name__}{hint}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}; convert it with {name}.float()"
        )


def check_tensor(name: str, t, want: str = "(B, H, N, d)") -> None:
    """One tensor: a 4-d floating-point ``torch.Tensor`` with no empty dimension."""
    check_float_tensor(name, t, want)
    if t.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions {want}, got {t.dim()} ({_describe(t)}); "
            f"a single head of shape (N, d) becomes (1, 1, N, d) with {name}[None, None]"
        )
    if 0 in t.shape:
        raise ValueError(f"{name} has an empty dimension ({_describe(t)}); every size in {want} must be >= 1")


def check_attention_inputs(q, k, v) -> Shapes:
    """Check q (B, H, Nq, d), k (B, Hkv, Nk, d) and v (B, Hkv, Nk, d); return their sizes."""
    check_tensor("q", q, "(B, H, Nq, d)")
    check_tensor("k", k, "(B, Hkv, Nk, d)")
    check_tensor("v", v, "(B, Hkv, Nk, d)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype is {t.dtype} but q.dtype is {q.dtype}; q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; move all three to one device, "
                f"e.g. {name}.to(q.device)"
            )
    B, H, Nq, d = q.shape
    Bk, Hkv, Nk, dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch size {Bk} but q has {B} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if dk != d:
        raise ValueError(
            f"k has head dim {dk} but q has {d}: q is (B, H, Nq, d) and k must be (B, Hkv, Nk, d) "
            f"with the same d (got q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"v must have the same shape as k, (B, Hkv, Nk, d) = {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if H % Hkv != 0:
        raise ValueError(
            f"q has {H} heads and k, v have {Hkv}: grouped-query attention needs H % Hkv == 0 "
            f"(each key/value head serves H // Hkv query heads)"
        )
    return Shapes(B, H, Hkv, Nq, Nk, d)


def check_like(name: str, t, like: torch.Tensor, like_name: str) -> None:
    """``t`` must be a tensor with the shape, dtype and device of ``like`` (e.g. dO like O)."""
    check_tensor(name, t)
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the shape of {like_name}, {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}.dtype is {t.dtype} but {like_name}.dtype is {like.dtype}; they must match")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; they must share a device")


def check_flag(name: str, value) -> bool:
    """A yes/no option such as ``causal`` must be a real bool (``causal='yes'`` is refused, not truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def softmax_scale(scale: Optional[float], d: int) -> float:
    """The factor applied to QKᵀ: ``scale`` if given, else 1/sqrt(d)."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) and not (
        isinstance(scale, torch.Tensor) and scale.numel() == 1
    ):
        raise TypeError(f"scale must be a number (the factor applied to Q Kᵀ, default 1/sqrt(d)), got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number (default 1/sqrt(d)), got {scale}")
    return scale


def causal_offset(Nq: int, Nk: int) -> int:
    """Bottom-right causal alignment: query i sees key j exactly when j <= i + (Nk - Nq)."""
    return Nk - Nq


def check_length(name: str, n) -> int:
    """A sequence length: an int >= 1, like every size of an attention input."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int (a number of tokens), got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"{name} must be >= 1 (a number of tokens), got {n}")
    return n


def causal_mask(Nq: int, Nk: int, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where query i may attend to key j (bottom-right aligned).

    ``device`` as in ``torch.arange`` (None: PyTorch's default device, normally the CPU).
    """
    check_length("Nq", Nq)
    check_length("Nk", Nk)
    device = factory_device(device)
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    return j <= i + causal_offset(Nq, Nk)


def window_mask(Nq: int, Nk: int, window_size=(-1, -1), *, causal: bool = False, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask of flash-attn's sliding window, True where query i may attend to key j:
    i + Nk − Nq − left <= j <= i + Nk − Nq + right, −1 for no limit on a side; ``causal`` sets right = 0.

    Measured from the bottom-right diagonal, like ``causal_mask`` (which is the window (−1, 0)).
    """
    mask = causal_mask(Nq, Nk, device) if causal else torch.ones(Nq, Nk, dtype=torch.bool, device=factory_device(device))
    left, right = window_size
    i = torch.arange(Nq, device=mask.device)[:, None] + causal_offset(Nq, Nk)
    j = torch.arange(Nk, device=mask.device)[None, :]
    if right >= 0:
        mask &= j <= i + right
    if left >= 0:
        mask &= j >= i - left
    return mask


def expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, Hkv, N, d) -> (B, H, N, d): query head h reads key/value head h // (H // Hkv)."""
    Hkv = t.shape[1]
    return t if Hkv == H else t.repeat_interleave(H // Hkv, dim=1)


def reduce_kv(t: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, H, N, d) -> (B, Hkv, N, d): sum the gradients of the H // Hkv query heads of each group."""
    B, H, N, d = t.shape
    return t if Hkv == H else t.view(B, Hkv, H // Hkv, N, d).sum(dim=2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the PyTorch implementations compute in: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# flash-attn's score options: window_size, softcap, alibi_slopes, dropout_p (flashcourse.flash_attention
# and flashcourse.flash_attn_interface check them once, here)


def check_window_size(window_size) -> tuple[int, int]:
    """flash-attn's ``window_size = (left, right)``: two ints >= -1, where -1 means no limit on that side.

    Query i sees key j when i + Nk - Nq - left <= j <= i + Nk - Nq + right. Integer tensors of one
    element are taken too (flash-attn's tests draw windows with ``torch.randint``).
    """
    hint = "(left, right), two ints >= -1, -1 for no limit on that side, e.g. window_size=(256, 0)"
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise ValueError(f"window_size must be {hint}; got {window_size!r}")
    sizes = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, torch.Tensor) and w.numel() == 1 and not w.is_floating_point() and w.dtype != torch.bool:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size must be {hint}; its {side} size is {w!r} ({type(w).__name__})")
        w = int(w)
        if w < -1:
            raise ValueError(f"window_size must be {hint}; its {side} size is {w}")
        sizes.append(w)
    return sizes[0], sizes[1]


def check_softcap(softcap) -> float:
    """``softcap``: scores become cap · tanh(score / cap) for a cap > 0; 0 switches it off."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a number >= 0 (0 switches soft-capping off), got {softcap!r}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 switches soft-capping off), got {softcap}")
    return softcap


def check_dropout_p(dropout_p) -> float:
    """``dropout_p``: the probability that an attention weight is dropped, 0 <= p < 1."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number in [0, 1), the probability of dropping a weight, got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(
            f"dropout_p must be in [0, 1), got {dropout_p} (set it to 0.0 for evaluation; 1.0 would drop everything)"
        )
    return dropout_p


def check_alibi_slopes(alibi_slopes, B: int, H: int, device) -> Optional[torch.Tensor]:
    """ALiBi slopes: None, or a float32 tensor of shape (H,) or (B, H) on the device of q."""
    if alibi_slopes is None:
        return None
    want = f"a float32 tensor of shape (H,) = ({H},) or (B, H) = ({B}, {H})"
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be {want}, got {type(alibi_slopes).__name__}")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ValueError(f"alibi_slopes must be {want}, got shape {tuple(alibi_slopes.shape)}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be {want}, got {alibi_slopes.dtype}; convert it with .float()")
    if alibi_slopes.device != torch.device(device):
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}; move it with .to(q.device)")
    return alibi_slopes
