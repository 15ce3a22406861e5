"""The worker: the only process that imports and runs the learner's code.

The grader starts one per chapter (``procs.WorkerProcess``) and sends it requests as ``wire`` frames:
call the learner's ``naive_attention`` (or run a driver of the chapter on the learner's module) with
these inputs. The worker answers with plain data: the results, what the code printed, and what it
saw of the code while it ran:

- provenance: each name an exercise must define comes from the submission file (its ``__module__``
  and its code's file); the first call of each exercise runs under ``cProfile``, which lists the
  Python code it ran: flashcourse code other than the stubs' helpers, or code from any file outside
  the Python installation and the submission (e.g. a copy of solutions/), breaks a rule;
- kernels: the exercise's Triton kernel must be launched, and the tensors returned must be ones
  that it wrote;
- inputs: each input is compared with a copy after the call (an input changed in place is named);
  on the CPU each input tensor ends right before a PROT_NONE page, so that a read past its end
  crashes at once, every time (the grader then finds which input by guarding one at a time);
- probes: optional watchers of the torch operations of one call (``probes.py``).

Nothing it sends is trusted: the grader compares every result with its own oracle.
"""

import contextlib
import cProfile
import ctypes
import inspect
import io
import mmap
import os
import site
import sys
import sysconfig
import traceback
from pathlib import Path

import flashcourse  # noqa: F401  (switches Triton's interpreter on before anything imports triton)
import torch

from . import wire
from .checks import chapter as chapter_checks
from .framework import ALLOWED, STUB_SUFFIX

MAX_OUTPUT = 2000  # characters of printed output kept per call
PAGE = mmap.PAGESIZE
PACKAGE = Path(flashcourse.__file__).resolve().parent


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


# --- inputs: guard pages on the CPU, padding on a GPU ---------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_mappings = []  # keeps every guarded mapping alive as long as the worker


def guarded_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of the dense tensor ``t`` (same strides) whose storage ends right before a PROT_NONE page."""
    nbytes = t.numel() * t.element_size()
    body = -(-nbytes // PAGE) * PAGE
    mapping = mmap.mmap(-1, body + PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    if _libc.mprotect(ctypes.c_void_p(address + body), PAGE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    _mappings.append(mapping)
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=body - nbytes).view(t.dtype)
    out = flat.as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def padded_like(t: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of ``t`` on ``device`` followed by NaN (a GPU read past the end gets NaN, not a neighbour)."""
    fill = float("nan") if t.dtype.is_floating_point else 0
    flat = torch.full((t.numel() + 4096,), fill, dtype=t.dtype, device=device)
    out = flat[: t.numel()].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def _leaves(x, name: str, out: list):
    """Append (name, tensor) for every tensor in x (tuples and lists by index)."""
    if isinstance(x, torch.Tensor):
        out.append((name, x))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _leaves(v, f"{name}[{i}]", out)
    return out


def _replace(x, table: dict):
    if isinstance(x, torch.Tensor):
        return table[id(x)]
    if isinstance(x, list):
        return [_replace(v, table) for v in x]
    if isinstance(x, tuple):
        return tuple(_replace(v, table) for v in x)
    return x


# --- what the learner's code ran -----------------------------------------------------------------

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


class Worker:
    """Answers the requests of one chapter on one target folder (a submission)."""

    def __init__(self, target: Path, chapter: str, *, guard_pages: bool = True):
        self.spec = chapter_checks(chapter)
        self.path = (Path(target) / f"{self.spec.file}.py").resolve()
        self.guard_pages = guard_pages and _libc is not None
        self.module = self.load_failure = None
        self.traced, self.origins, self.wrapped = set(), {}, set()
        self.launches = None  # while a call runs: storages of the tensors passed to the exercise's kernels
        self.roots = _trusted_roots()

    # the learner's module, loaded once
    def _load(self, out):
        if self.load_failure is not None:
            raise Failure(**self.load_failure)
        if self.module is not None:
            return self.module
        import importlib.util

        try:
            found = self.path.is_file() and os.access(self.path, os.R_OK)
        except OSError:
            found = False
        if not found:
            readable = os.access(self.path.parent, os.X_OK) and not self.path.exists()
            self.load_failure = {"kind": "missing_file" if readable else "unreadable", "file": self.path.name,
                                 "folder": str(self.path.parent), "uid": os.getuid()}
            raise Failure(**self.load_failure)
        spec = importlib.util.spec_from_file_location(self.spec.file, self.path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[self.spec.file] = module
        try:
            with self._captured(out):
                spec.loader.exec_module(module)
        except SyntaxError as e:
            self.load_failure = {"kind": "syntax", "file": self.path.name, "message": str(e.msg), "line": e.lineno}
        except BaseException as e:  # noqa: BLE001  (whatever the learner's file raises on import)
            self.load_failure = {"kind": "import", **self._exception(e)}
        if self.load_failure is not None:
            raise Failure(**self.load_failure)
        self.module = module
        return module

    def _exception(self, e: BaseException) -> dict:
        """type, first line of the message and the line of the submission file where it was raised."""
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == self.path]
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

    # provenance
    def _resolve(self, module, dotted: str):
        obj = module
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise Failure(kind="missing", file=self.path.name, name=dotted)
        return obj

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
                if not here or Path(code.co_filename).resolve() != self.path:
                    failure = {"kind": "origin", "file": self.path.name, "name": dotted,
                               "source": code.co_filename if not here or code.co_filename != "<string>" else "exec()"}
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

    def _judge(self, exercise, stats, defines) -> dict:
        """The rule that the traced call broke, or None. Of the forbidden flashcourse functions it ran,
        the one named is one that no flashcourse code called (the one the learner's code called)."""
        ran, resolved, forbidden, inner = set(), {}, [], set()
        for entry in stats:
            code = entry.code
            if isinstance(code, str):
                continue
            filename = code.co_filename
            ran.add((filename, code.co_name))
            if filename.startswith("<"):
                continue
            if filename not in resolved:
                resolved[filename] = Path(filename).resolve()
            if resolved[filename] == self.path:
                continue
            qualified = package_name(filename, getattr(code, "co_qualname", code.co_name))
            if qualified is not None:
                inner |= {c.code for c in entry.calls or ()}
                if code.co_name != "<module>" and not self._allowed(qualified, exercise):
                    forbidden.append((code, qualified))
            elif not str(resolved[filename]).startswith(self.roots):
                return {"kind": "foreign", "file": self.path.name, "name": exercise.name, "source": filename,
                        "function": code.co_name}
        if forbidden:
            outer = [q for c, q in forbidden if c not in inner] or [forbidden[0][1]]
            return {"kind": "forbidden", "file": self.path.name, "name": exercise.name, "calls": outer[0]}
        for dotted, code in defines:
            if (code.co_filename, code.co_name) not in ran:
                return {"kind": "unused", "file": self.path.name, "name": dotted}
        return None

    # kernels: launched, and the results are what they wrote
    def _record_launches(self, kernel) -> None:
        if id(kernel) in self.wrapped:
            return
        self.wrapped.add(id(kernel))
        run = kernel.run
        worker = self

        def recording_run(*args, **kwargs):
            if worker.launches is not None:
                for t in list(args) + list(kwargs.values()):
                    if isinstance(t, torch.Tensor):
                        worker.launches.add(t.untyped_storage().data_ptr())
                worker.launches.add("launched")
            return run(*args, **kwargs)

        kernel.run = recording_run

    # one request
    def handle(self, request: dict, send) -> None:
        out = BoundedWriter()
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
        reply.update(id=request.get("id"), output=out.getvalue())
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
            from .probes import PROBES

            spec = request["probe"]
            probe = PROBES[spec["name"]]([t for _, t in leaves], **spec.get("params", {}))
        for kernel in kernels:
            self._record_launches(kernel)
        self.launches = set()
        try:
            with self._captured(out), (probe or contextlib.nullcontext()):
                torch.manual_seed(0)
                if profiler:
                    profiler.enable()
                try:
                    value = target(*args, **kwargs)
                finally:
                    if profiler:
                        profiler.disable()
            if device != "cpu":
                torch.cuda.synchronize()
            launches = self.launches
        finally:
            self.launches = None
        if profiler:
            self._judge_trace(module, exercise, profiler.getstats())
            self.traced.add(exercise.name)
        value = self._results(value, device, kernels, launches, request.get("call", ""))
        modified = [name for (name, t), (copy, shape, stride) in zip(leaves, before)
                    if t.shape != shape or t.stride() != stride or not torch.equal(t, copy)]
        reply = {"value": value, "modified": modified}
        if probe is not None:
            reply["observed"] = probe.observed()
        return reply

    def _inputs(self, module, request: dict, device: str) -> tuple:
        """(callable, [(name, input tensor)], args, kwargs) of a request, the inputs placed: guarded on the
        CPU (every input, or those of ``request["guard"]``), followed by NaN on a GPU."""
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
        try:
            named = signature.bind_partial(*args, **kwargs).arguments
        except (AttributeError, TypeError):
            named = {**{f"argument {i + 1}": a for i, a in enumerate(args)}, **kwargs}
        leaves = []
        for name, value in named.items():
            _leaves(value, name, leaves)
        guard = request.get("guard")
        placed = {}
        for index, (name, t) in enumerate(leaves):
            if device != "cpu":
                placed[id(t)] = padded_like(t, device)
            elif self.guard_pages and guard is not False and (guard is None or index in guard) and t.numel():
                placed[id(t)] = guarded_like(t)
            else:
                placed[id(t)] = t
        leaves = [(name, placed[id(t)]) for name, t in leaves]
        return target, leaves, _replace(args, placed), _replace(kwargs, placed)

    def _judge_trace(self, module, exercise, stats) -> None:
        defines = [(d, _code_of(self._resolve(module, d))) for d in exercise.defines]
        broken = self._judge(exercise, stats, [(d, code) for d, (code, _, kernel) in defines if not kernel])
        if broken:
            raise Failure(**broken)

    def _results(self, value, device: str, kernels: list, launches: set, call: str):
        """The plain form of the learner's results; Failure when a kernel exercise's kernel did not run,
        or its launcher returned a tensor that the kernel did not write."""
        value, foreign = self._plain(value, device, launches if kernels else None)
        if kernels:
            names = ", ".join(k.fn.__name__ for k in kernels)
            if "launched" not in launches:
                raise Failure(kind="not_launched", file=self.path.name, kernel=names, call=call)
            if foreign:
                raise Failure(kind="not_written", file=self.path.name, kernel=names, call=call)
        return value

    def _plain(self, value, device: str, launches):
        """value with every non-plain tensor replaced by an Opaque that says why; and whether a tensor
        returned by a kernel exercise was not written by the exercise's kernel."""
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
                if launches is not None and x.numel() and x.untyped_storage().data_ptr() not in launches:
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


def main() -> None:
    """Serve requests on stdin/stdout (``wire`` frames) until stdin closes.

    The protocol uses private copies of the two pipes; fds 0, 1 and 2 become /dev/null, so that the
    learner's code (and Triton, and C++) can neither read requests nor write into the replies by
    accident, and ``input()`` gets EOF instead of waiting forever.
    """
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    header, blobs = wire.read_frame(requests)
    init = wire.decode(header, blobs)
    worker = Worker(Path(init["target"]), init["chapter"])
    send = lambda message: wire.write_message(replies, message)  # noqa: E731
    send({"ready": os.getpid()})
    while True:
        try:
            header, blobs = wire.read_frame(requests)
        except EOFError:
            return
        worker.handle(wire.decode(header, blobs), send)
