"""Every Triton launch of a call goes through the worker (``watching_launches``), which watches it.

- Memory: each tensor a kernel gets is copied into fresh memory and back after the launch. On the
  CPU (Triton's interpreter) that memory ends right before a page that cannot be read, so a load or a
  store past the end of a tensor crashes at once, every time (the grader then guards one tensor at a
  time to name it, the page unreadable or only unwritable to tell a load from a store); on a GPU it is
  followed by sentinel bytes, checked after the launch.
- Provenance: a kernel that is not the submission's (the package's, another file's) is refused.
- Results: the tensors a kernel exercise returns must be as its kernel left them (``Watch.as_written``),
  and its Python code may only allocate, move and reshape tensors (``TorchWork``): the kernel computes.
"""

import contextlib
import ctypes
import mmap
import sys

import torch
from torch.overrides import TorchFunctionMode

PAGE = mmap.PAGESIZE
PROT_NONE, PROT_READ, SLACK = 0, 1, 3  # after a tensor: a page that cannot be read / written, or slack (read-write)
MIN_SLACK = 1 << 16  # bytes of slack at least (a stray tile of a kernel lands there, not in the allocator's data)
SENTINEL, PADDING = 0xFF, 4096  # on a GPU: bytes after each tensor a kernel gets (0xFF.. is NaN in every float dtype)
# what the Python code of a kernel exercise may do with torch: allocate, convert, move, reshape, look
LAYOUT_OPS = frozenset("""
    empty empty_like empty_strided zeros zeros_like ones ones_like full full_like new_empty new_empty_strided new_zeros
    new_ones new_full contiguous clone detach detach_ copy_ to float half bfloat16 double cpu cuda type type_as view
    view_as reshape reshape_as transpose permute t expand expand_as flatten unflatten squeeze unsqueeze narrow select
    __getitem__ __setitem__ split chunk unbind as_strided stride size dim numel nelement element_size data_ptr
    is_contiguous storage_offset untyped_storage __len__ __get__ __set__ is_floating_point requires_grad_ __format__
    __repr__ __str__ __hash__
""".split())

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _byte_span(t: torch.Tensor) -> tuple:
    """(first, end): the bytes of t's storage that t reaches."""
    size = t.element_size()
    first = t.storage_offset() * size
    return first, first + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * size


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of t, as uint8."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _fresh(nbytes: int, device: torch.device, protect) -> tuple:
    """(memory, sentinel bytes after it or None): nbytes of uint8 that end right before a page of protection
    ``protect`` (CPU, protect not None; SLACK: as many read-write bytes as the tensor, at least MIN_SLACK),
    else followed by PADDING sentinel bytes."""
    if device.type == "cpu" and protect is not None and _libc is not None:
        body = -(-nbytes // PAGE) * PAGE
        if protect == SLACK:
            mapping = mmap.mmap(-1, body + -(-max(nbytes, MIN_SLACK) // PAGE) * PAGE)
            return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=body - nbytes), None
        mapping = mmap.mmap(-1, body + PAGE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        if _libc.mprotect(ctypes.c_void_p(address + body), PAGE, protect) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=body - nbytes), None
    memory = torch.full((nbytes + PADDING,), SENTINEL, dtype=torch.uint8, device=device)
    return memory[:nbytes], memory[nbytes:]


class Placement:
    """The tensors of one launch moved into fresh memory (tensors that share a storage share it there too),
    and back again after the launch."""

    def __init__(self, tensors: list, protect_of):
        """tensors: [(index, tensor)]; protect_of(index): PROT_NONE / PROT_READ for a guard page, SLACK for
        harmless room, None for sentinel bytes (a GPU)."""
        groups = {}
        for index, t in tensors:
            protect = protect_of(index)
            if not t.numel() or any(s < 0 for s in t.stride()):
                continue
            group = groups.setdefault((t.device, t.untyped_storage().data_ptr()), {"members": [], "protect": protect})
            group["members"].append((index, t))
            if protect is not None and (group["protect"] is None or protect < group["protect"]):
                group["protect"] = protect  # the strictest of its tensors
        self.groups, self.moved = [], {}
        for (device, _), group in groups.items():
            spans = [_byte_span(t) for _, t in group["members"]]
            lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
            if any((first - lo) % t.element_size() for (first, _), (_, t) in zip(spans, group["members"])):
                continue  # views at offsets that are no multiple of their element size: left where they are
            memory, pad = _fresh(hi - lo, device, group["protect"])
            source = _storage_bytes(group["members"][0][1])
            memory.copy_(source[lo:hi])
            for (first, _), (index, t) in zip(spans, group["members"]):
                self.moved[index] = torch.empty(0, dtype=t.dtype, device=device).set_(
                    memory.untyped_storage(), (first - lo) // t.element_size(), t.shape, t.stride())
            self.groups.append((source, lo, hi, memory, pad, [index for index, _ in group["members"]]))

    def restore(self) -> list:
        """Copy every group back; the indices of the tensors whose sentinel bytes were written over."""
        overrun = []
        for source, lo, hi, memory, pad, members in self.groups:
            source[lo:hi].copy_(memory)
            if pad is not None and bool((pad != SENTINEL).any()):
                overrun.append(members[0])
        return overrun


def _op_name(func) -> str:
    return getattr(func, "__name__", "") or type(func).__name__


class TorchWork(TorchFunctionMode):
    """The first torch operation that computes, run by a kernel exercise's Python code outside its launches."""

    def __init__(self, watch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        watch = self.watch
        if watch.depth == 0 and watch.broken is None:
            name = _op_name(func)
            if name not in LAYOUT_OPS:
                watch.broken = {"kind": "torch_work", "op": name}
        return func(*args, **(kwargs or {}))


class Watch:
    """What the worker sees of one call: the kernels it launches, and where the rules are broken."""

    def __init__(self, rule_of, exercise, kernels: list, guard, device: str):
        """rule_of(fn, exercise): the rule broken by launching the kernel of Python function fn, or None."""
        self.rule_of, self.exercise, self.guard, self.device = rule_of, exercise, guard, device
        self.kernels = {id(k.fn): k.fn.__name__ for k in kernels}  # the exercise's own kernels
        self.launched = []  # names of the exercise's kernels, as launched
        self.written = {}  # storage -> (first, end, bytes) as the exercise's kernel left them
        self.args = []  # the tensors the kernels got, in launch order: "attention_fwd_kernel's K"
        self.broken = None  # the first rule the call broke (a failure record)
        self.depth = 0  # > 0 inside a launch

    def refuse(self, record: dict) -> None:
        if self.broken is None:
            self.broken = record

    def _protect(self, index: int):
        """What follows tensor ``index`` of the call's launches: a guard page (all of them, or those of
        guard["only"], unreadable or with guard["write"] only unwritable), slack, or sentinel bytes (GPU)."""
        if self.device != "cpu":
            return None
        guard = self.guard
        if guard is None:
            return PROT_NONE
        if index in guard.get("only", []):
            return PROT_READ if guard.get("write") else PROT_NONE
        return SLACK

    def launch(self, run, kernel, args, kwargs, launch_options):
        """``run(kernel, *args, **launch_options, **kwargs)`` (Triton's own launch) with every tensor argument in
        fresh memory; a kernel that is not the submission's is refused, an exercise kernel's results recorded."""
        fn = getattr(kernel, "fn", None)
        name = getattr(fn, "__name__", type(kernel).__name__)
        rule = self.rule_of(fn, self.exercise)
        if rule:
            self.refuse(rule)
            raise PermissionError(f"the grader does not let this exercise launch {name}")
        self.depth += 1
        try:
            params = list(getattr(kernel, "arg_names", []) or [])
            named = [(params[i] if i < len(params) else f"argument {i + 1}", a) for i, a in enumerate(args)]
            named += list(kwargs.items())
            tensors = []
            for param, value in named:
                if type(value) is torch.Tensor:
                    tensors.append((len(self.args), value))
                    self.args.append(f"{name}'s {param}")
            placed = Placement(tensors, self._protect)
            swap = {id(t): placed.moved[i] for i, t in tensors if i in placed.moved}
            args = [swap.get(id(a), a) for a in args]
            kwargs = {k: swap.get(id(v), v) for k, v in kwargs.items()}
            try:
                result = run(kernel, *args, **launch_options, **kwargs)
            finally:
                overrun = placed.restore()
            if overrun:
                self.refuse({"kind": "overrun", "arg": self.args[overrun[0]]})
            if id(fn) in self.kernels:
                self.launched.append(name)
                for _, t in tensors:
                    first, end = _byte_span(t)
                    self.written[(t.device, t.untyped_storage().data_ptr())] = (first, end, _storage_bytes(t)[first:end].clone())
            return result
        finally:
            self.depth -= 1

    def as_written(self, t: torch.Tensor) -> bool:
        """t lies in the memory that an exercise kernel wrote, and nothing changed it since."""
        entry = self.written.get((t.device, t.untyped_storage().data_ptr()))
        if entry is None:
            return False
        first, end, snapshot = entry
        t_first, t_end = _byte_span(t)
        return first <= t_first and t_end <= end and torch.equal(_storage_bytes(t)[first:end], snapshot)


_KERNEL_CLASSES = []


def _kernel_classes() -> list:
    """The Triton classes whose ``run`` launches a kernel (JITFunction; InterpretedFunction in the interpreter)."""
    if not _KERNEL_CLASSES:
        from triton.runtime.jit import JITFunction

        _KERNEL_CLASSES.append(JITFunction)
        try:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNEL_CLASSES.append(InterpretedFunction)
        except ImportError:
            pass
    return _KERNEL_CLASSES


@contextlib.contextmanager
def watching_launches(watch: Watch):
    """While the call runs, every kernel launch goes through ``watch.launch``."""
    installed = []
    for cls in _kernel_classes():
        original = cls.__dict__["run"]

        def run(self, *args, grid, warmup, _original=original, **kwargs):
            if warmup:
                return _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return watch.launch(_original, self, args, kwargs, {"grid": grid, "warmup": warmup})

        cls.run = run
        installed.append((cls, original, run))
    try:
        yield
    finally:
        for cls, original, run in installed:
            if cls.__dict__.get("run") is not run:
                watch.refuse({"kind": "tampered", "name": f"triton {cls.__name__}.run"})
            cls.run = original
