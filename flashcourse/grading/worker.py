"""The worker: the only process that imports and runs the learner's code.

The grader starts one per chapter (``procs.WorkerProcess``) and sends it requests as ``wire`` frames:
first the submission's source text (the grader read it; the worker compiles exactly that), then
calls: run the learner's ``naive_attention`` (or a driver of the chapter on the learner's module) on
these inputs. The worker answers with plain data: the results, what the code printed, and what it
saw of the code while it ran:

- provenance: each name an exercise must define is code compiled from the submission's text (not
  imported, loaded or ``exec``-ed from elsewhere); every call of a PyTorch exercise, and the first
  call of a kernel exercise, runs under ``cProfile``, which lists the code it ran: flashcourse code
  other than the stubs' helpers (also when ``exec``-ed from its source), code from any file outside
  the Python installation and the submission (e.g. a copy of solutions/), or a library function the
  exercise is about (e.g. ``torch.softmax`` in ``safe_softmax``) breaks a rule;
- kernels: every Triton launch is watched. A kernel of the package may not be launched; each tensor a
  kernel gets is copied into fresh memory that ends right before a page that cannot be read (CPU) or
  that is followed by sentinel bytes (GPU), so a load or store past its end crashes at once, every
  time, or is seen; the tensors a kernel exercise returns must be as its kernel left them, and its
  Python code may only allocate, move and reshape tensors (the kernel computes);
- inputs: each input is compared with a copy after the call (an input changed in place is named);
- the process: code of the submission may not start threads or processes, use ctypes, read files, switch
  the profiler off or look at the grader's frames (an audit hook refuses these), nor replace functions
  of Python, torch, numpy, Triton, flashcourse or the grader (checked after the import and every call);
- probes: optional watchers of the torch operations of one call (``probes.py``).

Uninitialised memory (``torch.empty``) is filled with NaN, and every call starts from the same seeds,
so that the same submission gives the same results every time. Nothing the worker sends is trusted:
the grader compares every result with its own oracle.
"""

import _thread
import builtins
import contextlib
import cProfile
import ctypes
import importlib.util
import inspect
import io
import linecache
import mmap
import os
import random
import re
import site
import sys
import sysconfig
import threading
import traceback
import types
from pathlib import Path

import flashcourse  # noqa: F401  (switches Triton's interpreter on before anything imports triton)
import numpy
import torch
from torch.overrides import TorchFunctionMode

from . import wire
from .checks import chapter as chapter_checks
from .framework import ALLOWED, STUB_SUFFIX
from .probes import PROBES

MAX_OUTPUT = 2000  # characters of printed output kept per call
PAGE = mmap.PAGESIZE
PACKAGE = Path(flashcourse.__file__).resolve().parent
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
# audit events that the submission's own code may not raise (the plain ways out of the worker's sight)
REFUSED_EVENTS = {"open": "opened a file", "os.fork": "started a process", "os.forkpty": "started a process", "os.posix_spawn": "started a process",
                  "os.spawn": "started a process", "os.exec": "started a program", "os.system": "started a program",
                  "subprocess.Popen": "started a program", "os.kill": "sent a signal", "os.killpg": "sent a signal",
                  "signal.pthread_kill": "sent a signal", "sys.setprofile": "switched the profiler off",
                  "sys.settrace": "switched the profiler off", "sys._getframe": "looked at the grader's frames",
                  "sys.addaudithook": "added an audit hook", "gc.get_objects": "looked at the grader's objects",
                  "gc.get_referrers": "looked at the grader's objects", "gc.get_referents": "looked at the grader's objects",
                  "object.__getattr__": "looked at the grader's frames", "sys._current_frames": "looked at the grader's frames"}
# refused only when the submission's code itself does them (the standard library may: warnings, logging, traceback)
DIRECT_EVENTS = {"sys._getframe", "object.__getattr__", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                 "sys._current_frames"}
FRAME_ATTRIBUTES = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}


class Failure(Exception):
    """A request that ends without a result: ``record`` says why, as plain data."""

    def __init__(self, **record):
        super().__init__(record)
        self.record = record


class BoundedWriter(io.StringIO):
    """A text stream that keeps the first MAX_OUTPUT characters written to it."""

    def write(self, s) -> int:
        s = str(s)
        room = MAX_OUTPUT - self.tell()
        if room > 0:
            super().write(s[:room])
        return len(s)


# --- fresh memory for the tensors of a launch: guard pages on the CPU, sentinel bytes on a GPU ---------

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


# --- what the learner's code ran ----------------------------------------------------------------------

def _trusted_roots() -> tuple:
    """Folders whose code any submission may run: the Python installation and its packages."""
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= set(getattr(site, "getsitepackages", lambda: [])())
    for name in ("torch", "triton", "numpy"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            paths.add(str(Path(module.__file__).resolve().parents[1]))
    # what Triton compiles for a GPU lives in its cache
    paths.add(os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton"))
    return tuple(str(Path(p).resolve()) + os.sep for p in paths if p)


STDLIB = tuple(str(Path(sysconfig.get_paths()[k]).resolve()) + os.sep for k in ("stdlib", "platstdlib"))
SITE = tuple(str(Path(p).resolve()) + os.sep for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                                       *getattr(site, "getsitepackages", lambda: [])()})


def _stdlib(filename: str) -> bool:
    """Code of Python's standard library (in a virtual env the packages live below it: they are not)."""
    return filename.startswith(STDLIB) and not filename.startswith(SITE)


def package_name(filename: str, qualname: str):
    """'flashcourse.softmax.online_softmax' for code of the flashcourse package, else None."""
    try:
        rel = Path(filename).resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    parts = ["flashcourse", *rel.with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts + [qualname])


def _code_of(obj):
    fn = getattr(obj, "fn", None)  # a Triton kernel (JITFunction or InterpretedFunction)
    if fn is not None and hasattr(fn, "__code__"):
        return fn.__code__, fn, True
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        fn = getattr(obj, "__func__", obj)
        return fn.__code__, fn, False
    return None, obj, False


def _codes(code) -> list:
    """code and every code object nested in it."""
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _codes(const)
    return found


def _twin_key(code) -> tuple:
    """What two compilations of the same function's text share, wherever they were compiled."""
    return code.co_code, code.co_names, code.co_varnames, code.co_argcount


_BUILTIN = re.compile(r"<(?:built-in method|method) '?([\w.]+?)'?(?: of |>)")


def _reached_from(sources: set, stats) -> set:
    """The code objects of ``sources`` that some code of ``sources`` reached, through any calls between."""
    callees = {e.code: [c.code for c in e.calls or ()] for e in stats}
    frontier = [c for s in sources for c in callees.get(s, [])]
    seen, reached = set(), set()
    while frontier:
        code = frontier.pop()
        if code in seen:
            continue
        seen.add(code)
        if code in sources:
            reached.add(code)
        frontier += callees.get(code, [])
    return reached


def _library_name(filename: str, qualname: str) -> str:
    """'torch.autograd.graph._engine_run_backward' for a function of an installed package."""
    for root in SITE + STDLIB:
        if filename.startswith(root):
            return ".".join([*Path(filename[len(root):]).with_suffix("").parts, qualname])
    return qualname


def builtin_name(entry: str) -> tuple:
    """('softmax', 'Tensor.softmax') of cProfile's "<method 'softmax' of 'torch._C.TensorBase' objects>",
    ('scaled_dot_product_attention', 'torch._C._nn.scaled_dot_product_attention') of its
    '<built-in method torch._C._nn.scaled_dot_product_attention>': the name, and how to show it."""
    m = _BUILTIN.match(entry)
    if not m:
        return "", ""
    return m.group(1).rsplit(".", 1)[-1], m.group(1) if entry.startswith("<built-in") else f"Tensor.{m.group(1)}"


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

    def __init__(self, worker, exercise, kernels: list, guard, device: str):
        self.worker, self.exercise, self.guard, self.device = worker, exercise, guard, device
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
        fn = getattr(kernel, "fn", None)
        name = getattr(fn, "__name__", type(kernel).__name__)
        rule = self.worker.kernel_rule(fn, self.exercise)
        if rule:
            self.refuse(rule)
            raise Failure(**rule)
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


def _namespaces() -> list:
    """(name, namespace) of what the grader relies on in the worker: Python's builtins, torch, numpy, the
    stdlib modules the worker uses, Triton's launchers, and every module and class of flashcourse."""
    import json
    import struct

    import triton.runtime.jit as jit

    spaces = [("builtins", builtins), ("torch", torch), ("torch._C", torch._C), ("torch.nn.functional", torch.nn.functional),
              ("torch.overrides", torch.overrides), ("torch.autograd", torch.autograd), ("numpy", numpy),
              ("torch.Tensor", torch.Tensor), ("torch._C.TensorBase", torch._C.TensorBase),
              ("torch.nn.Module", torch.nn.Module), ("TorchFunctionMode", TorchFunctionMode)]
    import signal

    for module in (json, struct, io, os, inspect, cProfile, traceback, contextlib, mmap, ctypes, threading, _thread,
                   linecache, importlib.util, random, types, jit, signal):
        spaces.append((module.__name__, module))
    spaces.append(("cProfile.Profile", cProfile.Profile))
    spaces += [("sys", sys, ("getprofile", "setprofile", "settrace", "gettrace", "_getframe", "exc_info", "addaudithook",
                             "audit"))]
    spaces += [(f"{c.__module__}.{c.__name__}", c) for c in _kernel_classes()]
    spaces.append(("sys.modules", sys.modules, [n for n in sys.modules if n == "flashcourse" or n.startswith("flashcourse.")]))
    for name, module in list(sys.modules.items()):
        if name == "flashcourse" or name.startswith("flashcourse."):
            spaces.append((name, module))
            spaces += [(f"{name}.{k}", v) for k, v in vars(module).items()
                       if isinstance(v, type) and getattr(v, "__module__", None) == name]
    return spaces


def _relied_on(value) -> bool:
    return callable(value) or isinstance(value, (type, types.ModuleType)) or hasattr(type(value), "__get__")


class Integrity:
    """The functions and classes the grader relies on, as they were before the learner's code ran."""

    def __init__(self):
        self.entries = []
        for name, space, *keys in _namespaces():
            table = space if isinstance(space, dict) else vars(space)
            chosen = keys[0] if keys else list(table)
            self.entries += [(name, table, key, table[key]) for key in chosen if key in table and _relied_on(table[key])]

    def changed(self):
        """'torch.equal' for the first of them that is no longer what it was, else None."""
        for name, table, key, value in self.entries:
            if table.get(key) is not value:
                return f"{name}.{key}"
        return None


class Worker:
    """Answers the requests of one chapter on one submission (its source text, as the grader read it).

    isolate=False: this is the grader's own process (the project's tests): no audit hook, no integrity
    checks, no NaN-filled memory; kernels still launch through the watch.
    """

    def __init__(self, target: Path, chapter: str, source, *, unreadable=None, isolate: bool = True):
        self.spec = chapter_checks(chapter)
        self.path = (Path(target) / f"{self.spec.file}.py").resolve()
        self.source, self.unreadable, self.isolate = source, unreadable, isolate
        self.module = self.load_failure = None
        self.traced, self.origins = set(), {}
        self.genuine = {}  # id -> code object compiled from the submission's text
        self.twins = None  # _twin_key -> qualified name of flashcourse's functions
        self.watch = None  # the Watch of the call (or import) that runs
        self.last_args = []
        self.roots = _trusted_roots()
        self.integrity = Integrity() if isolate else None

    # the learner's module, compiled from the source text once
    def _load(self, out):
        if self.load_failure is not None:
            raise Failure(**self.load_failure)
        if self.module is not None:
            return self.module
        if self.source is None:
            self.load_failure = {"kind": "unreadable" if self.unreadable else "missing_file", "file": self.path.name,
                                 "folder": str(self.path.parent), "message": self.unreadable}
            raise Failure(**self.load_failure)
        name = self.spec.file
        try:
            code = compile(self.source, str(self.path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte
            self.load_failure = {"kind": "syntax", "file": self.path.name, "message": str(getattr(e, "msg", e)),
                                 "line": getattr(e, "lineno", None)}
            raise Failure(**self.load_failure) from None
        self.genuine = {id(c): c for c in _codes(code)}
        # Triton and tracebacks read the source by file name: give them this text, not the disk's
        linecache.cache[str(self.path)] = (len(self.source), None, self.source.splitlines(True), str(self.path))
        spec = importlib.util.spec_from_file_location(name, self.path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        watch = self.watch = Watch(self, self.spec.spec(""), [], None, "cpu")
        try:
            with self._captured(out):
                exec(code, module.__dict__)
        except BaseException as e:  # noqa: BLE001  (whatever the learner's file raises on import)
            self.load_failure = {"kind": "import", **self._exception(e)}
        finally:
            self.watch = None
        broken = watch.broken or self._tampered()
        if broken:
            self.load_failure = {"file": self.path.name, **broken, "importing": True}
        if self.load_failure is not None:
            raise Failure(**self.load_failure)
        self.module = module
        return module

    def _tampered(self):
        name = self.integrity.changed() if self.integrity else None
        return {"kind": "tampered", "name": name} if name else None

    def _exception(self, e: BaseException) -> dict:
        """type, first line of the message and the line of the submission file where it was raised."""
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(self.path)]
        text = (str(e).strip().splitlines() or [""])[0][:300]
        return {"type": type(e).__name__, "message": text, "line": frames[-1].lineno if frames else None,
                "file": self.path.name}

    @contextlib.contextmanager
    def _captured(self, out):
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved

    # the learner's frames
    def is_learner(self, frame, via_inspect: bool = False) -> bool:
        """frame runs the submission's code; via_inspect: or runs ``inspect`` for it (inspect.currentframe)."""
        if via_inspect and frame.f_code.co_filename == inspect.__file__ and frame.f_back is not None:
            frame = frame.f_back
        return frame.f_code.co_filename == str(self.path)

    def learner_frame(self, frame) -> bool:
        """The nearest frame outside the standard library (and outside code compiled from strings, which
        runs on behalf of its caller) runs the submission's code."""
        while frame is not None:
            filename = frame.f_code.co_filename
            if not (_stdlib(filename) or filename.startswith("<")):
                return self.is_learner(frame)
            frame = frame.f_back
        return False

    def refused_read(self, target, frame) -> bool:
        """Whether opening ``target`` from ``frame`` is the submission reading a file: its own code opens it
        (open, inspect.getsource, runpy), or a library it called does (torch.load) outside the Python
        installation. The import system, Triton (reading kernels' source) and the worker's own folders may."""
        if isinstance(target, int) or not isinstance(target, (str, bytes, os.PathLike)):
            return False
        name = os.path.abspath(os.fsdecode(target))
        scratch = os.environ.get("TMPDIR")
        if name in (str(self.path), os.devnull, "/dev/urandom") or scratch and name.startswith(scratch + os.sep):
            return False
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return False
        nearest, learner, triton = None, False, False
        while frame is not None:
            filename = frame.f_code.co_filename
            if nearest is None and not (_stdlib(filename) or filename.startswith("<")):
                nearest = self.is_learner(frame)
            learner = learner or self.is_learner(frame)
            triton = triton or f"{os.sep}triton{os.sep}" in filename
            frame = frame.f_back
        return bool(nearest) or learner and not triton and not name.startswith(self.roots)

    def refuse(self, what: str, event: str) -> None:
        """Record that the learner's code tried ``what`` (refused), and stop it."""
        watch = self.watch
        if watch is not None:
            watch.refuse({"kind": "refused", "what": what, "event": event})
        raise PermissionError(f"the grader does not let exercises do this: {what} ({event})")

    # provenance
    def _resolve(self, module, dotted: str):
        obj = module
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise Failure(kind="missing", file=self.path.name, name=dotted)
        return obj

    def _is_genuine(self, code) -> bool:
        """code was compiled from the submission's text (or is Triton's interpreter's rewrite of such a kernel)."""
        if self.genuine.get(id(code)) is code:
            return True
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return False
        for fn, rewritten in list(InterpretedFunction.rewritten_fn.items()):
            if self.genuine.get(id(getattr(fn, "__code__", None))) is not None and hasattr(rewritten, "__code__"):
                if any(c is code for c in _codes(rewritten.__code__)):
                    return True
        return False

    def _check_origins(self, module, exercise) -> list:
        """The kernels among the names the exercise must define; Failure when one is not defined here."""
        if exercise.name not in self.origins:
            kernels, failure = [], None
            for dotted in exercise.defines:
                try:
                    obj = self._resolve(module, dotted)
                except Failure as e:
                    failure = e.record
                    break
                code, fn, kernel = _code_of(obj)
                owner = self._resolve(module, dotted.split(".")[0]) if "." in dotted else fn
                if code is None:
                    failure = {"kind": "missing", "file": self.path.name, "name": dotted, "got": type(obj).__name__}
                    break
                here = getattr(fn, "__module__", None) == module.__name__ and getattr(owner, "__module__", None) == module.__name__
                if not here or not self._is_genuine(code):
                    source = code.co_filename
                    if source.startswith("<") or Path(source).resolve() == self.path:
                        source = "exec() or compile() of text that is not in the file"
                    failure = {"kind": "origin", "file": self.path.name, "name": dotted, "source": source}
                    break
                if kernel:
                    kernels.append(obj)
                    failure = failure or self._kernel_calls(obj, exercise)
            self.origins[exercise.name] = (kernels, failure)
        kernels, failure = self.origins[exercise.name]
        if failure:
            raise Failure(**failure)
        return kernels

    def _allowed(self, qualified: str, exercise) -> bool:
        return any(qualified.startswith(a) for a in ALLOWED + exercise.allow)

    def _kernel_calls(self, kernel, exercise):
        """A flashcourse kernel function that this kernel's code names (a call inside a kernel is compiled
        on a GPU, where no profiler sees it)."""
        fn = kernel.fn
        for name in fn.__code__.co_names:
            obj = fn.__globals__.get(name)
            candidates = [obj] + [getattr(obj, n, None) for n in fn.__code__.co_names] if inspect.ismodule(obj) else [obj]
            for c in candidates:
                inner = getattr(c, "fn", None)
                if inner is None or not hasattr(inner, "__code__"):
                    continue
                qualified = package_name(inner.__code__.co_filename, inner.__qualname__)
                if qualified and not self._allowed(qualified, exercise):
                    return {"kind": "forbidden", "file": self.path.name, "name": exercise.name, "calls": qualified}
        return None

    def _twin(self, code):
        """The qualified name of the flashcourse function whose compiled text ``code`` is, or None."""
        if self.twins is None:
            self.twins = {}
            for name, module in list(sys.modules.items()):
                if not (name == "flashcourse" or name.startswith("flashcourse.")) or name.startswith("flashcourse.grading"):
                    continue
                for obj in list(vars(module).values()):
                    members = vars(obj).values() if isinstance(obj, type) else [obj]
                    for member in members:
                        inner = getattr(member, "fn", member)
                        fcode = getattr(getattr(inner, "__func__", inner), "__code__", None)
                        if isinstance(fcode, types.CodeType) and package_name(fcode.co_filename, "") is not None:
                            for c in _codes(fcode):
                                self.twins.setdefault(_twin_key(c), package_name(c.co_filename, c.co_qualname))
        return self.twins.get(_twin_key(code))

    def kernel_rule(self, fn, exercise):
        """The rule broken by launching the kernel whose Python function is ``fn``, or None."""
        code = getattr(fn, "__code__", None)
        if code is None or self._is_genuine(code):
            return None
        qualified = package_name(code.co_filename, fn.__qualname__) or self._twin(code)
        if qualified is not None:
            if self._allowed(qualified, exercise):
                return None
            return {"kind": "forbidden", "file": self.path.name, "name": exercise.name, "calls": qualified}
        if str(Path(code.co_filename).resolve()).startswith(self.roots):
            return None
        return {"kind": "foreign", "file": self.path.name, "name": exercise.name, "source": code.co_filename,
                "function": code.co_name}

    def _judge(self, exercise, stats, defines) -> dict:
        """The rule that the traced call broke, or None. Of the forbidden flashcourse functions it ran,
        the one named is one that no other of them reached (the one the learner's code called)."""
        ran, resolved, forbidden = set(), {}, []
        for entry in stats:
            code = entry.code
            if isinstance(code, str):
                name, shown = builtin_name(code)
                if name in exercise.forbid:
                    return {"kind": "forbidden", "file": self.path.name, "name": exercise.name, "calls": shown,
                            "library": True}
                continue
            filename = code.co_filename
            ran.add((filename, code.co_name))
            if filename not in resolved:
                resolved[filename] = filename if filename.startswith("<") else str(Path(filename).resolve())
            if filename.startswith("<") or resolved[filename] == str(self.path):
                if self._is_genuine(code) or filename.startswith("<frozen") or code.co_name == "<module>":
                    continue  # (a <module> only defines: Triton's interpreter compiles each kernel anew)
                twin = self._twin(code)
                if twin is not None and not self._allowed(twin, exercise):
                    forbidden.append((code, twin))
                elif not filename.startswith("<"):  # under the file's name, compiled from other text
                    return {"kind": "foreign", "file": self.path.name, "name": exercise.name,
                            "source": "exec() or compile() of text that is not in the file", "function": code.co_name}
                continue
            qualified = package_name(filename, getattr(code, "co_qualname", code.co_name))
            if qualified is not None:
                if code.co_name != "<module>" and not self._allowed(qualified, exercise):
                    forbidden.append((code, qualified))
            elif not resolved[filename].startswith(self.roots):
                return {"kind": "foreign", "file": self.path.name, "name": exercise.name, "source": filename,
                        "function": code.co_name}
            elif code.co_name in exercise.forbid:
                return {"kind": "forbidden", "file": self.path.name, "name": exercise.name, "library": True,
                        "calls": _library_name(resolved[filename], getattr(code, "co_qualname", code.co_name))}
        if forbidden:
            inner = _reached_from({c for c, _ in forbidden}, stats)
            outer = [q for c, q in forbidden if c not in inner] or [forbidden[0][1]]
            return {"kind": "forbidden", "file": self.path.name, "name": exercise.name, "calls": outer[0]}
        for dotted, code in defines:
            if (code.co_filename, code.co_name) not in ran:
                return {"kind": "unused", "file": self.path.name, "name": dotted}
        return None

    # one request
    def handle(self, request: dict, send) -> None:
        out = BoundedWriter()
        self.last_args = []
        try:
            reply = self._call(request, send, out)
        except Failure as e:
            reply = {"failure": e.record}
        except NotImplementedError as e:
            text = str(e)
            reply = {"failure": {"kind": "not_implemented", "message": text if text.endswith(STUB_SUFFIX) else ""}}
        except SystemExit as e:
            reply = {"failure": {"kind": "exit", "code": str(e.code)[:100], **self._exception(e)}}
        except BaseException as e:  # noqa: BLE001  (whatever the learner's code raises)
            reply = {"failure": {"kind": "exception", **self._exception(e)}}
        reply.update(id=request.get("id"), output=out.getvalue(), launch_args=self.last_args)
        try:
            send(reply)
        except Exception as e:  # noqa: BLE001  (e.g. a result too large to send)
            send({"id": request.get("id"), "output": out.getvalue(),
                  "failure": {"kind": "result", "message": f"{type(e).__name__}: {e}"[:300]}})

    def _call(self, request: dict, send, out) -> dict:
        module = self._load(out)
        exercise = self.spec.spec(request["exercise"])
        kernels = self._check_origins(module, exercise)
        device = request.get("device", "cpu")
        target, leaves, args, kwargs = self._inputs(module, request, device)
        before = [(t.clone(), t.shape, t.stride()) for _, t in leaves]
        send({"id": request.get("id"), "inputs": [name for name, _ in leaves]})
        # every call of a PyTorch exercise is profiled; a kernel's first call (the interpreter is slow to
        # profile), the later ones are held to launching the kernel and returning what it wrote
        profiler = cProfile.Profile() if not kernels or exercise.name not in self.traced else None
        probe = None
        if request.get("probe"):
            spec = request["probe"]
            probe = PROBES[spec["name"]]([t for _, t in leaves], **spec.get("params", {}))
        watch = self.watch = Watch(self, exercise, kernels, request.get("guard"), device)
        work = TorchWork(watch) if kernels else contextlib.nullcontext()
        stopped, error = False, None
        try:
            with self._captured(out), watching_launches(watch), work, (probe or contextlib.nullcontext()):
                self._seed()
                if profiler:
                    profiler.enable()
                try:
                    value = target(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001  (judged below: a broken rule comes first)
                    error = e
                finally:
                    if profiler:
                        stopped = sys.getprofile() is not profiler
                        profiler.disable()
            if device != "cpu" and error is None:
                torch.cuda.synchronize()
        finally:
            self.watch, self.last_args = None, watch.args
        # the rules broken, the most telling first: what the trace names (the outermost forbidden function)
        if profiler:
            self._judge_trace(module, exercise, profiler.getstats(), complete=error is None)
        broken = watch.broken or self._tampered()
        if broken is None and stopped:
            broken = {"kind": "refused", "what": "switched the profiler off", "event": "sys.setprofile"}
        if broken:
            raise Failure(**{"file": self.path.name, "name": exercise.name, "call": request.get("call", ""), **broken})
        if error is not None:
            raise error
        if profiler:
            self.traced.add(exercise.name)
        value = self._results(value, device, kernels, watch, request.get("call", ""))
        modified = [name for (name, t), (copy, shape, stride) in zip(leaves, before)
                    if t.shape != shape or t.stride() != stride or not torch.equal(t, copy)]
        reply = {"value": value, "modified": modified}
        if probe is not None:
            reply["observed"] = probe.observed()
        return reply

    @staticmethod
    def _seed() -> None:
        torch.manual_seed(0)
        random.seed(0)
        numpy.random.seed(0)

    def _inputs(self, module, request: dict, device: str) -> tuple:
        """(callable, [(name, input tensor)], args, kwargs) of a request, the inputs on their device."""
        if "driver" in request:
            driver = self.spec.drivers[request["driver"]]
            target = lambda *a, **k: driver(module, *a, **k)  # noqa: E731
            signature = inspect.signature(driver)
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        else:
            target = self._resolve(module, request["call"])
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                signature = None
        args, kwargs = list(request.get("args", [])), dict(request.get("kwargs", {}))
        if device != "cpu":
            args, kwargs = _on(args, device), _on(kwargs, device)
        try:
            named = signature.bind_partial(*args, **kwargs).arguments
        except (AttributeError, TypeError):
            named = {**{f"argument {i + 1}": a for i, a in enumerate(args)}, **kwargs}
        leaves = []
        for name, value in named.items():
            _leaves(value, name, leaves)
        return target, leaves, args, kwargs

    def _judge_trace(self, module, exercise, stats, complete: bool = True) -> None:
        """Failure for the rule that a traced call broke; complete=False (the call raised): only what it ran
        counts, not what it did not get to run."""
        defines = [(d, _code_of(self._resolve(module, d))) for d in exercise.defines] if complete else []
        broken = self._judge(exercise, stats, [(d, code) for d, (code, _, kernel) in defines if not kernel])
        if broken:
            raise Failure(**broken)

    def _results(self, value, device: str, kernels: list, watch: Watch, call: str):
        """The plain form of the learner's results; Failure when a kernel exercise's kernel did not run,
        or its launcher returned a tensor that is not as the kernel left it."""
        value, foreign = self._plain(value, device, watch if kernels else None)
        if kernels:
            names = ", ".join(k.fn.__name__ for k in kernels)
            if not watch.launched:
                raise Failure(kind="not_launched", file=self.path.name, kernel=names, call=call)
            if foreign:
                raise Failure(kind="not_written", file=self.path.name, kernel=names, call=call)
        return value

    def _plain(self, value, device: str, watch):
        """value with every non-plain tensor replaced by an Opaque that says why; and whether a tensor
        returned by a kernel exercise is not as the exercise's kernel left it."""
        foreign = []

        def walk(x, depth=0):
            if depth > wire.MAX_DEPTH:
                return wire.Opaque("a structure nested too deeply")
            if isinstance(x, torch.Tensor):
                why = wire.plain_tensor(x)
                if why:
                    return wire.Opaque(type(x).__name__, why)
                if x.device.type != device:
                    return wire.Opaque("torch.Tensor", f"a tensor on {x.device.type}, expected on {device}")
                if watch is not None and x.numel() and not watch.as_written(x):
                    foreign.append(x)
                return x
            if type(x) is list:
                return [walk(v, depth + 1) for v in x]
            if isinstance(x, tuple):
                return tuple(walk(v, depth + 1) for v in tuple.__iter__(x))
            if type(x) is dict:
                return {k: walk(v, depth + 1) for k, v in x.items()}
            return x

        return walk(value), bool(foreign)


def _on(x, device: str):
    """x with every tensor copied to ``device``, strides kept."""
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device).copy_(x)
    if isinstance(x, list):
        return [_on(v, device) for v in x]
    if isinstance(x, tuple):
        return tuple(_on(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _on(v, device) for k, v in x.items()}
    return x


def _leaves(x, name: str, out: list):
    """Append (name, tensor) for every tensor in x (tuples and lists by index)."""
    if isinstance(x, torch.Tensor):
        out.append((name, x))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _leaves(v, f"{name}[{i}]", out)
    return out


def _guard_the_process(worker: Worker) -> None:
    """Refuse the plain ways out of the worker's sight to the submission's own code: an audit hook (which
    cannot be removed) for processes, ctypes, files, the profiler and frames; wrappers for starting threads."""
    busy = []

    def audit(event, args):
        if busy:  # the hook's own look at the frames
            return
        what = REFUSED_EVENTS.get(event) or ("used ctypes" if event.startswith("ctypes.") else None)
        if what is None or event == "object.__getattr__" and args[1] not in FRAME_ATTRIBUTES:
            return
        busy.append(True)
        try:
            frame = sys._getframe(1)
            if event in DIRECT_EVENTS:
                refused = worker.is_learner(frame, via_inspect=True)
            elif event == "open":
                refused = worker.refused_read(args[0], frame)
            else:
                refused = worker.learner_frame(frame)
        finally:
            busy.clear()
        if refused:
            worker.refuse(what, f"open {os.fsdecode(args[0])[:200]}" if event == "open" else event)

    import signal

    for module, name, what in ((_thread, "start_new_thread", "started a thread"),
                               (_thread, "start_joinable_thread", "started a thread"),
                               (threading, "_start_new_thread", "started a thread"),
                               (threading, "_start_joinable_thread", "started a thread"),
                               # a handler runs later, outside the call, and is handed the worker's frame
                               (signal, "signal", "set a signal handler"), (signal, "setitimer", "set a timer"),
                               (signal, "alarm", "set a timer")):
        original = getattr(module, name, None)
        if original is None:
            continue

        def start(*args, _original=original, _what=what, _event=f"{module.__name__}.{name}", **kwargs):
            if worker.learner_frame(sys._getframe(1)):
                worker.refuse(_what, _event)
            return _original(*args, **kwargs)

        setattr(module, name, start)
    sys.addaudithook(audit)


def main() -> None:
    """Serve requests on stdin/stdout (``wire`` frames) until stdin closes.

    The protocol uses private copies of the two pipes; fds 0, 1 and 2 become /dev/null, so that the
    learner's code (and Triton, and C++) can neither read requests nor write into the replies by
    accident, and ``input()`` gets EOF instead of waiting forever.
    """
    import warnings

    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # the same submission gives the same results: torch.empty is NaN, not what the memory held before
    # (the C switch: torch.use_deterministic_algorithms would also import the whole compiler stack, 1 s)
    getattr(torch._C, "_set_deterministic_algorithms", torch.use_deterministic_algorithms)(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    warnings.filterwarnings("ignore", message=".*deterministic.*")
    read = lambda: wire.read_frame(requests, max_header=wire.TRUSTED_HEADER, max_blobs=wire.TRUSTED_BLOBS)  # noqa: E731
    init = wire.decode(*read(), clean=False)
    worker = Worker(Path(init["target"]), init["chapter"], init.get("source"), unreadable=init.get("unreadable"))
    _guard_the_process(worker)
    worker.integrity = Integrity()  # after the worker's own wrappers, before any learner code
    send = lambda message: wire.write_message(replies, message)  # noqa: E731
    send({"ready": os.getpid()})
    while True:
        try:
            frame = read()
        except EOFError:
            return
        worker.handle(wire.decode(*frame, clean=False), send)
