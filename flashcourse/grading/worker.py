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
- kernels: every Triton launch goes through the worker (``launches.py``): guard pages or sentinels
  around each tensor, no kernel of the package, results as the exercise's kernel left them;
- inputs: each input is compared with a copy after the call (an input changed in place is named);
- the process: what the submission's code may not do, and the check that it left Python, torch and
  the grader as they were (``sandbox.py``);
- probes: optional watchers of the torch operations of one call (``probes.py``).

Uninitialised memory (``torch.empty``) is filled with NaN, and every call starts from the same seeds,
so that the same submission gives the same results every time. Nothing the worker sends is trusted:
the grader compares every result with its own oracle.
"""

import contextlib
import cProfile
import importlib.util
import inspect
import io
import linecache
import os
import random
import re
import sys
import traceback
import types
from pathlib import Path

import flashcourse  # noqa: F401  (switches Triton's interpreter on before anything imports triton)
import numpy
import torch

from . import wire
from .checks import chapter as chapter_checks
from .framework import ALLOWED, STUB_SUFFIX
from .launches import TorchWork, Watch, watching_launches
from .probes import PROBES
from .sandbox import SITE, STDLIB, Integrity, LearnerFrames, guard_the_process, profiling, trusted_roots

MAX_OUTPUT = 2000  # characters of printed output kept per call
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


# --- what the learner's code ran ----------------------------------------------------------------------

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


def _reached(sources: set, stats) -> dict:
    """code of ``sources`` -> the codes it reached, through any calls between (cProfile's callees)."""
    callees = {e.code: [c.code for c in e.calls or ()] for e in stats}
    reached = {}
    for start in sources:
        frontier, seen = list(callees.get(start, [])), set()
        while frontier:
            code = frontier.pop()
            if code not in seen:
                seen.add(code)
                frontier += callees.get(code, [])
        reached[start] = seen
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
        self.roots = trusted_roots()
        self.frames = LearnerFrames(self.path, self.roots)
        warm_up()
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
        watch = self.watch = Watch(self.kernel_rule, self.spec.spec(""), [], None, "cpu")
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
            # named: those that the learner's code called (no other forbidden one reached them), the one that
            # ran most of the others first (the implementation, not a helper called beside it), then by name
            codes = {c for c, _ in forbidden}
            reached = _reached(codes, stats)
            inner = set().union(*reached.values()) & codes
            outer = [(c, q) for c, q in forbidden if c not in inner] or forbidden
            named = sorted({q: -len(reached[c] & codes) for c, q in outer}.items(), key=lambda qs: (qs[1], qs[0]))
            return {"kind": "forbidden", "file": self.path.name, "name": exercise.name,
                    "calls": " and ".join(q for q, _ in named[:3])}
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
        watch = self.watch = Watch(self.kernel_rule, exercise, kernels, request.get("guard"), device)
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
                        stopped = not profiling(profiler)
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


def warm_up() -> None:
    """Make torch do what it does on the first call of flashcourse's custom ops (import some 800 modules
    and register the ops' dispatch), on meta tensors: under Python 3.12's cProfile a learner's first call
    would otherwise lose the entries of its callers (``flashcourse.flash_attention`` called by the
    submission would not be in the trace)."""
    m = torch.empty(1, 1, 1, 16, device="meta", requires_grad=True)
    o, _, _ = torch.ops.flashcourse.flash_attn_fwd(m, m, m, False, 0.25)
    o.sum().backward()


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
    # one thread: the time limit counts the CPU time of all threads, and idle OpenMP threads spinning on a
    # busy many-core machine would spend it
    torch.set_num_threads(1)
    getattr(torch._C, "_set_deterministic_algorithms", torch.use_deterministic_algorithms)(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    warnings.filterwarnings("ignore", message=".*deterministic.*")
    read = lambda: wire.read_frame(requests, max_header=wire.TRUSTED_HEADER, max_blobs=wire.TRUSTED_BLOBS)  # noqa: E731
    init = wire.decode(*read(), clean=False)
    worker = Worker(Path(init["target"]), init["chapter"], init.get("source"), unreadable=init.get("unreadable"))
    guard_the_process(worker.frames, worker.refuse)
    worker.integrity = Integrity()  # after the worker's own wrappers, before any learner code
    send = lambda message: wire.write_message(replies, message)  # noqa: E731
    send({"ready": os.getpid()})
    while True:
        try:
            frame = read()
        except EOFError:
            return
        worker.handle(wire.decode(*frame, clean=False), send)
