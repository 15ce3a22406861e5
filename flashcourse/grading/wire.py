"""The plain-data protocol between the grader and its worker: JSON with raw tensor bytes, never pickle.

A message is ``MAGIC``, the length of a UTF-8 JSON header ``{"body": ..., "$blobs": [sizes]}``, the
header, then the raw bytes of each tensor it mentions. In the body a tensor is ``{"$tensor": i, "dtype": ..., "shape": [...],
"device": ...}`` (its bytes are blob ``i``; bfloat16 travels as its raw 16-bit patterns), a tuple is
``{"$tuple": [...]}``, and any other object the learner returned is ``{"$object": "<type name>"}``.

The reader trusts nothing: it caps the sizes, accepts only the dtypes of ``DTYPES``, checks that the
bytes match the shape, and rebuilds tensors as plain CPU ``torch.Tensor``s from bytes. Whatever a
worker sends, the grader gets numbers, strings, lists, tuples, dicts and plain tensors.
"""

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Optional

import torch

MAGIC = b"FCW1"
MAX_HEADER = 1 << 20  # bytes of JSON in a reply (messages and printed output are capped far below)
MAX_BLOBS = 1 << 26  # bytes of tensor data in a reply (the largest result of a check is ~1 MiB)
TRUSTED_HEADER, TRUSTED_BLOBS = 1 << 26, 1 << 30  # the grader's requests: the source text, the inputs
MAX_DIM = 1 << 31  # elements along one dim of a tensor
MAX_DEPTH = 16
# characters that a terminal or a viewer would act on instead of showing: controls (but tab and newline),
# DEL and C1, zero-width and bidirectional marks; a worker's strings show them escaped
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")

DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)}


class ProtocolError(Exception):
    """A message that is not what the protocol allows (a broken or hostile worker)."""


@dataclass(frozen=True)
class Opaque:
    """An object that is not plain data, known only by its type name (e.g. a tensor subclass)."""

    type_name: str
    reason: str = ""

    def __repr__(self) -> str:
        return self.type_name


# --- encoding (both sides) ---------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a plain tensor, row-major (bfloat16 as its bit patterns)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def plain_tensor(t) -> Optional[str]:
    """Why ``t`` cannot be sent as a plain tensor, or None when it can."""
    if type(t) is not torch.Tensor:
        return f"a subclass {type(t).__name__} of torch.Tensor"
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    if str(t.dtype).replace("torch.", "") not in DTYPES:
        return f"a tensor of dtype {t.dtype}"
    if t.device.type == "meta":
        return "a meta tensor (no data)"
    return None


def encode(obj, *, layout: bool = False) -> tuple:
    """(header dict, blobs) of ``obj``. layout=True also sends each tensor's dimension order, so that
    a transposed (non-contiguous) input arrives with the same strides."""
    blobs = []

    def enc(x, depth):
        if depth > MAX_DEPTH:
            return {"$object": "a structure nested too deeply"}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, Opaque):
            return {"$object": x.type_name, "reason": x.reason}
        if isinstance(x, (int, float)) and type(x) in (int, float):
            return x
        if isinstance(x, torch.Tensor):
            why = plain_tensor(x)
            if why:
                return {"$object": type(x).__name__, "reason": why}
            entry = {"$tensor": len(blobs), "dtype": str(x.dtype).replace("torch.", ""),
                     "shape": list(x.shape), "device": x.device.type}
            if layout and x.dim() > 1 and not x.is_contiguous():
                # order: the dims from outermost to innermost in memory; the data is sent in that order
                order = sorted(range(x.dim()), key=lambda i: -x.stride(i))
                entry["order"] = order
                x = x.permute(order)
            blobs.append(_tensor_bytes(x))
            return entry
        if type(x) in (list,):
            return [enc(v, depth + 1) for v in x]
        if isinstance(x, tuple):  # namedtuples (SoftmaxState) travel as plain tuples
            return {"$tuple": [enc(v, depth + 1) for v in x]}
        if type(x) is dict and all(type(k) is str for k in x):
            return {"$dict": {k: enc(v, depth + 1) for k, v in x.items()}}
        return {"$object": type(x).__name__[:80]}

    return enc(obj, 0), blobs


def write_message(stream, obj, *, layout: bool = False) -> None:
    body, blobs = encode(obj, layout=layout)
    text = json.dumps({"body": body, "$blobs": [len(b) for b in blobs]}).encode()
    stream.write(MAGIC + struct.pack("<Q", len(text)) + text)
    for b in blobs:
        stream.write(b)
    stream.flush()


# --- decoding (the grader side trusts nothing) -------------------------------------------------

def printable(text: str) -> str:
    """``text`` with every character that a terminal would act on (ESC, CR, bidi marks, ...) escaped."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def _read_exactly(stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def read_frame(stream, *, max_header: int = MAX_HEADER, max_blobs: int = MAX_BLOBS) -> tuple:
    """The next (header, blobs) of ``stream``; EOFError at the end, ProtocolError if malformed."""
    head = stream.read(len(MAGIC) + 8)
    if not head:
        raise EOFError
    if len(head) < len(MAGIC) + 8:
        head += _read_exactly(stream, len(MAGIC) + 8 - len(head))
    if head[: len(MAGIC)] != MAGIC:
        raise ProtocolError("a message without the protocol's marker")
    (size,) = struct.unpack("<Q", head[len(MAGIC):])
    if size > max_header:
        raise ProtocolError(f"a header of {size} bytes")
    try:
        header = json.loads(_read_exactly(stream, size))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        raise ProtocolError("a header that is not JSON") from None
    sizes = header.get("$blobs") if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(type(s) is int and s >= 0 for s in sizes) or sum(sizes) > max_blobs:
        raise ProtocolError("a message with invalid or too large tensor data")
    return header.get("body"), [_read_exactly(stream, s) for s in sizes]


def decode(header, blobs, place=None, *, clean: bool = True):
    """Plain data from a header and its blobs (tensors on the CPU unless ``place`` moves them).

    clean: escape the unprintable characters of every string (a worker's strings reach a terminal);
    False for the grader's own requests (they carry the submission's source text)."""
    text = printable if clean else str

    def dec(x, depth):
        if depth > MAX_DEPTH:
            raise ProtocolError("a structure nested too deeply")
        if type(x) is str:
            return text(x)
        if x is None or type(x) in (bool, int, float):
            return x
        if type(x) is list:
            return [dec(v, depth + 1) for v in x]
        if type(x) is not dict:
            raise ProtocolError("an unknown value")
        if "$tensor" in x:
            t = _tensor(x, blobs)
            return t if place is None else place(x, t)
        if "$tuple" in x and type(x["$tuple"]) is list:
            return tuple(dec(v, depth + 1) for v in x["$tuple"])
        if "$dict" in x and type(x["$dict"]) is dict:
            return {text(k): dec(v, depth + 1) for k, v in x["$dict"].items()}
        if "$object" in x:
            return Opaque(text(str(x["$object"])[:80]), text(str(x.get("reason", ""))[:200]))
        return {text(k): dec(v, depth + 1) for k, v in x.items()}  # the protocol's own records

    return dec(header, 0)


def _tensor(entry: dict, blobs: list) -> torch.Tensor:
    index, dtype, shape = entry.get("$tensor"), DTYPES.get(entry.get("dtype")), entry.get("shape")
    if type(index) is not int or not 0 <= index < len(blobs) or dtype is None:
        raise ProtocolError("a tensor with an unknown dtype or no data")
    if type(shape) is not list or len(shape) > 8 or not all(type(s) is int and 0 <= s < MAX_DIM for s in shape):
        raise ProtocolError("a tensor with an invalid shape")
    order = entry.get("order")
    if order is not None and (type(order) is not list or sorted(order) != list(range(len(shape)))):
        raise ProtocolError("a tensor with an invalid dimension order")
    itemsize = torch.empty((), dtype=dtype).element_size()
    blob = blobs[index]
    if len(blob) != math.prod(shape) * itemsize:
        raise ProtocolError(f"a tensor of shape {shape} with {len(blob)} bytes of data")
    stored = [shape[i] for i in order] if order else shape
    t = (torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype) if blob
         else torch.empty(0, dtype=dtype)).reshape(stored)
    if order:
        t = t.permute([order.index(i) for i in range(len(shape))])
    return t


def through(obj, *, layout: bool = False, place=None, clean: bool = True):
    """``obj`` as it arrives after a trip through the protocol (the in-process worker of the tests)."""
    import io

    stream = io.BytesIO()
    write_message(stream, obj, layout=layout)
    stream.seek(0)
    return decode(*read_frame(stream, max_header=TRUSTED_HEADER, max_blobs=TRUSTED_BLOBS), place, clean=clean)
