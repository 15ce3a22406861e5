"""What the submission's code may not do in the worker, and the check that it left the grader as it was.

The worker's structure and provenance checks watch the learner's own process, so they are only as
good as that process is honest. These make the plain ways around them fail:

- an audit hook (which Python code cannot remove) refuses to the submission's own code processes,
  programs, signals, files, ctypes, switching the profiler off, and looking at frames or at the garbage
  collector's objects; wrappers refuse threads, signal handlers, timers and (Python 3.12+, where cProfile
  is a ``sys.monitoring`` tool) monitoring calls (``guard_the_process``);
- ``Integrity`` records the functions and classes of Python, torch, numpy, Triton, flashcourse and the
  grader before any learner code runs, and names the first that changed, after the import and after
  every call.

"The submission's own code" is the nearest frame outside the standard library (``LearnerFrames``):
torch, Triton or the grader may do these things on its behalf (Triton compiles, reads kernel sources).
"""

import _thread
import builtins
import contextlib
import cProfile
import ctypes
import importlib.util
import inspect
import io
import json
import linecache
import mmap
import os
import random
import signal
import site
import struct
import sys
import sysconfig
import threading
import traceback
import types
from pathlib import Path

import numpy
import torch
from torch.overrides import TorchFunctionMode

from .launches import _kernel_classes

# audit events that the submission's own code may not raise (the plain ways out of the worker's sight)
REFUSED_EVENTS = {"open": "opened a file", "os.fork": "started a process", "os.forkpty": "started a process",
                  "os.posix_spawn": "started a process", "os.spawn": "started a process",
                  "os.exec": "started a program", "os.system": "started a program",
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


def trusted_roots() -> tuple:
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


def _namespaces() -> list:
    """(name, namespace) of what the grader relies on in the worker: Python's builtins, torch, numpy, the
    stdlib modules the worker uses, Triton's launchers, and every module and class of flashcourse."""
    import triton.runtime.jit as jit

    spaces = [("builtins", builtins), ("torch", torch), ("torch._C", torch._C), ("torch.nn.functional", torch.nn.functional),
              ("torch.overrides", torch.overrides), ("torch.autograd", torch.autograd), ("numpy", numpy),
              ("torch.Tensor", torch.Tensor), ("torch._C.TensorBase", torch._C.TensorBase),
              ("torch.nn.Module", torch.nn.Module), ("TorchFunctionMode", TorchFunctionMode)]
    for module in (json, struct, io, os, inspect, cProfile, traceback, contextlib, mmap, ctypes, threading, _thread,
                   linecache, importlib.util, random, types, jit, signal):
        spaces.append((module.__name__, module))
    spaces.append(("cProfile.Profile", cProfile.Profile))
    spaces += [("sys", sys, ("getprofile", "setprofile", "settrace", "gettrace", "_getframe", "exc_info", "addaudithook",
                             "audit"))]
    if hasattr(sys, "monitoring"):
        spaces.append(("sys.monitoring", sys.monitoring))
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


class LearnerFrames:
    """Which frames run the submission's code (the file at ``path``), and which file reads are its own."""

    def __init__(self, path: Path, roots: tuple):
        self.path, self.roots = str(path), roots

    def is_learner(self, frame, via_inspect: bool = False) -> bool:
        """frame runs the submission's code; via_inspect: or runs ``inspect`` for it (inspect.currentframe)."""
        if via_inspect and frame.f_code.co_filename == inspect.__file__ and frame.f_back is not None:
            frame = frame.f_back
        return frame.f_code.co_filename == self.path

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
        if name in (self.path, os.devnull, "/dev/urandom") or scratch and name.startswith(scratch + os.sep):
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


def guard_the_process(frames: LearnerFrames, refuse) -> None:
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
                refused = frames.is_learner(frame, via_inspect=True)
            elif event == "open":
                refused = frames.refused_read(args[0], frame)
            else:
                refused = frames.learner_frame(frame)
        finally:
            busy.clear()
        if refused:
            refuse(what, f"open {os.fsdecode(args[0])[:200]}" if event == "open" else event)

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
            if frames.learner_frame(sys._getframe(1)):
                refuse(_what, _event)
            return _original(*args, **kwargs)

        setattr(module, name, start)
    # Python 3.12+: cProfile is a sys.monitoring tool (its calls come from the grader's frames)
    monitoring = getattr(sys, "monitoring", None)
    for name in ("use_tool_id", "free_tool_id", "clear_tool_id", "set_events", "set_local_events", "register_callback"):
        original = getattr(monitoring, name, None)
        if original is None:
            continue

        def monitor(*args, _original=original, _event=f"sys.monitoring.{name}", **kwargs):
            if frames.learner_frame(sys._getframe(1)):
                refuse("switched the profiler off", _event)
            return _original(*args, **kwargs)

        setattr(monitoring, name, monitor)
    sys.addaudithook(audit)


def profiling(profiler) -> bool:
    """Whether ``profiler`` (an enabled cProfile.Profile) still sees every call."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:  # Python 3.11: the profile function
        return sys.getprofile() is profiler
    return monitoring.get_tool(monitoring.PROFILER_ID) is not None and monitoring.get_events(monitoring.PROFILER_ID) != 0
