"""Watchers of the torch operations of one call, run in the worker around the learner's code.

Each probe is a ``TorchFunctionMode`` that follows where the data of the inputs goes and reports
what it saw as plain data (``observed()``); the grader decides what that means. They watch the
plain forms of a program (slices, elementwise operations, reductions, matmul, einsum), not every
possible obfuscation.

Both take the call's input tensors in order (``inputs``) and refer to them by position.

- ``one_pass`` (online softmax): which columns of x each max, sum and exp reaches. One pass means
  every reduction stays inside one block of ``block`` columns and each block's max is followed by
  that block's exp before the next block's max (the final normalisation may read x again).
- ``tiles`` (tiled attention): a score-shaped tensor (rows from queries, columns from keys, or the
  transpose) must not exceed one B_r × B_c tile: queries along B_r = block_m, keys along B_c = block_n;
  PyTorch's scaled_dot_product_attention counts as the whole score matrix.
"""

import re

import torch
from torch.overrides import TorchFunctionMode

REDUCTIONS = {"amax": "max", "max": "max", "sum": "sum", "nansum": "sum", "mean": "sum", "logsumexp": "sum",
              "softmax": "sum", "log_softmax": "sum", "_softmax": "sum", "cumsum": "sum"}
EXPS = {"exp", "exp_", "exp2", "exp2_", "special_exp2", "expm1", "softmax", "log_softmax", "_softmax", "logsumexp"}


def _tensors(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors(v, out)
    return out


class _Tags(TorchFunctionMode):
    """Keeps a tag per tensor produced during the call (tensors are kept alive while it runs)."""

    def __init__(self):
        super().__init__()
        self.tags = {}

    def tag(self, t, default=None):
        entry = self.tags.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else default

    def set(self, t, tag) -> None:
        self.tags[id(t)] = (t, tag)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self.seen(func, args, kwargs, out)
        except Exception:  # noqa: BLE001  (a probe never breaks the learner's call)
            pass
        return out


class OnePass(_Tags):
    """Columns of x (as a bit mask) that each tensor's last dim is aligned with."""

    def __init__(self, inputs: list, *, x: int, block: int):
        super().__init__()
        self.x, self.block = inputs[x], block
        self.N = self.x.shape[-1]
        self.storage = self.x.untyped_storage().data_ptr()
        self.set(self.x, (1 << self.N) - 1)
        self.violation, self.pending = None, None  # pending: the block whose max awaits its exp

    def columns(self, t) -> int:
        tag = self.tag(t)
        if tag is not None:
            return tag
        if t.untyped_storage().data_ptr() == self.storage and t.dtype == self.x.dtype:  # a view of x
            offsets = torch.arange(self.x.numel()).as_strided(t.shape, t.stride(), t.storage_offset() - self.x.storage_offset())
            mask = 0
            for c in torch.unique(offsets % self.N).tolist():
                mask |= 1 << int(c)
            return mask
        return 0

    def span(self, mask: int) -> tuple:
        return (mask & -mask).bit_length() - 1, mask.bit_length() - 1

    def seen(self, func, args, kwargs, out):
        name = getattr(func, "__name__", "")
        ins = _tensors(list(args) + list(kwargs.values()), [])
        if not ins or self.violation:
            return
        first = ins[0]
        cols = self.columns(first)
        reduction = REDUCTIONS.get(name)
        if name == "max" and len([a for a in args if isinstance(a, torch.Tensor)]) > 1:
            reduction = None  # torch.max(a, b) is elementwise
        if cols and (reduction or name in EXPS):
            lo, hi = self.span(cols)
            if reduction and lo // self.block != hi // self.block:
                self.violation = {"rule": "whole", "op": name, "columns": [lo, hi + 1]}
            elif reduction == "max":
                block = lo // self.block
                if self.pending is not None and self.pending != block:
                    p = self.pending
                    self.violation = {"rule": "order", "op": name, "columns": [lo, hi + 1],
                                      "pending": [p * self.block, min((p + 1) * self.block, self.N)]}
                self.pending = block
            if name in EXPS and self.pending is not None:
                if cols >> (self.pending * self.block) & ((1 << self.block) - 1):
                    self.pending = None
        outs = _tensors(out, [])
        for o in outs:
            mask = 0
            for t in ins:
                if t.dim() and o.dim() and t.shape[-1] == o.shape[-1]:
                    mask |= self.columns(t)
            if reduction and o.dim() and first.dim() and o.shape[-1] != first.shape[-1]:
                mask = 0
            if mask:
                self.set(o, mask)

    def observed(self) -> dict:
        return {"violation": self.violation}


_TRANSPOSES = ("transpose", "swapaxes", "swapdims", "transpose_")
_MATMULS = ("matmul", "__matmul__", "mm", "bmm")


class Tiles(_Tags):
    """A tag (kind of axis -2, kind of axis -1) per tensor, kinds 'Q' (query rows) or 'K' (key rows)."""

    def __init__(self, inputs: list, *, roles: list, block_m: int, block_n: int, Nq: int, Nk: int):
        super().__init__()
        for t, kind in zip(inputs, roles):
            if kind:
                self.set(t, (kind, None))
        self.block_m, self.block_n, self.Nq, self.Nk = block_m, block_n, Nq, Nk
        self.violation = None
        self._getters = {torch.Tensor.mT.__get__, torch.Tensor.T.__get__, torch.Tensor.mH.__get__}

    def _kinds(self, func, name, args, kwargs, out):
        tensors = _tensors(list(args) + list(kwargs.values()), [])
        if name in _MATMULS or name == "__rmatmul__":
            a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
            ka, kb = self.tag(a, (None, None)), self.tag(b, (None, None))
            return (ka[0] if a.dim() > 1 else None, kb[1] if b.dim() > 1 else None)
        if name in ("baddbmm", "addmm", "addbmm"):
            ka, kb = self.tag(args[1], (None, None)), self.tag(args[2], (None, None))
            return (ka[0], kb[1])
        if name == "einsum":
            return self._einsum(args)
        source = tensors[0] if tensors else None
        tag = self.tag(source) if source is not None else None
        if tag is None:
            tagged = [t for t in tensors if self.tag(t) is not None]
            if not tagged:
                return None
            source, tag = tagged[0], self.tag(tagged[0])
        if func in self._getters or name in ("t", "t_"):
            return (tag[1], tag[0])
        if name in _TRANSPOSES or name == "permute":
            n = source.dim()
            dims = [d % n for d in (args[1:3] if name != "permute" else
                                    (args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]))]
            if name == "permute":
                axis = {n - 2: tag[0], n - 1: tag[1]}
                return (axis.get(dims[-2]), axis.get(dims[-1]))
            if sorted(dims) == [n - 2, n - 1]:
                return (tag[1], tag[0])
            return tag if not {n - 2, n - 1} & set(dims) else None
        if isinstance(out, torch.Tensor) and (out.dim() == source.dim() or out.shape[-2:] == source.shape[-2:]):
            return tag
        return None

    def _einsum(self, args):
        spec = args[0].replace(" ", "")
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if "->" not in spec:
            return None
        ins, result = spec.split("->")
        letters = {}
        for sub, t in zip(ins.split(","), operands):
            sub = re.sub(r"\.\.\.", "", sub)
            tag = self.tag(t, (None, None))
            if len(sub) >= 2:
                letters.setdefault(sub[-2], tag[0])
                letters.setdefault(sub[-1], tag[1])
        result = re.sub(r"\.\.\.", "", result)
        return (letters.get(result[-2]), letters.get(result[-1])) if len(result) >= 2 else None

    def seen(self, func, args, kwargs, out):
        if self.violation:
            return
        name = getattr(func, "__name__", "")
        if "scaled_dot_product" in name:  # whole rows of scores, built where no probe sees them
            self.violation = {"op": name, "shape": [self.Nq, self.Nk], "whole": True}
            return
        kinds = self._kinds(func, name, args, kwargs, out) if args else None
        for o in _tensors(out, []):
            if o.dim() < 2:
                continue
            if tuple(o.shape[-2:]) in ((self.Nq, self.Nk), (self.Nk, self.Nq)):
                self.violation = {"op": name, "shape": list(o.shape[-2:]), "whole": True}
                return
            if kinds is None or not any(kinds):
                continue
            self.set(o, kinds)
            if set(kinds) == {"Q", "K"}:
                rows, cols = o.shape[-2], o.shape[-1]
                q, k = (rows, cols) if kinds[0] == "Q" else (cols, rows)
                if q > self.block_m or k > self.block_n:
                    self.violation = {"op": name, "queries": q, "keys": k, "transposed": kinds[0] == "K"}
                    return

    def observed(self) -> dict:
        return {"violation": self.violation}


PROBES = {"one_pass": OnePass, "tiles": Tiles}
