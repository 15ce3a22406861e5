"""Run the checks of some chapters against a target folder: a fresh worker process per chapter.

The grader (this process) never imports the learner's code. For each chapter it starts a worker
(``procs.WorkerProcess``), and each check calls the learner's functions through a ``Submission``:
the inputs travel to the worker as data, the learner's function runs there on its own copies, and
the results come back as data (``wire``), to be compared with the oracle that the check computes
here on its own inputs. A check that overruns its time limit, or a worker that dies, costs a fresh
worker for the checks that remain. When a chapter ends, its worker and everything it started are
killed and reaped before the next chapter (and before any report is written).
"""

import ast
import contextlib
import importlib.util
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from . import wire
from .checks import all_chapters, chapter_ids
from .framework import GRADER_NAMES, STUB_SUFFIX, CheckFailed, seeded
from .procs import StillRunning, WorkerDied, WorkerProcess, WorkerTimeout, subreaper

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 60.0  # seconds of the worker's CPU time per check (the slowest takes a few on a 2-core CPU)
WALL_FACTOR = 3  # ... and of wall time, this many times as long (a check that sleeps; a machine that is busy)
POLL = 0.25  # seconds between two looks at the worker's CPU time
START_TIMEOUT = 300.0  # seconds for a worker to import torch and Triton (the first time is slow)
MAX_OUTPUT = 2000  # characters of captured learner output kept per check
MAX_SOURCE = 4 << 20  # bytes of a submission file
MAX_GUARDED = 32  # tensors guarded one at a time to find the one a crashed kernel read past


class TargetError(Exception):
    """The target cannot be graded at all (e.g. the folder does not exist)."""


class GradingInterrupted(Exception):
    """Ctrl-C while grading; ``results`` holds the checks that finished."""

    def __init__(self, results: list):
        super().__init__("interrupted")
        self.results = results


@dataclass
class Result:
    """The outcome of one check. status: passed | failed | not implemented | timed out | error | not run."""

    chapter: str
    exercise: str
    name: str
    points: int
    earned: int
    status: str
    message: str = ""
    hint: str = ""
    output: str = ""
    seconds: float = 0.0


def chapter_id(chapter) -> str:
    """'ch02', 'ch02_softmax', '02', '2' or 2 -> 'ch02'; ValueError naming the chapters otherwise."""
    text = str(chapter).strip().lower()
    text = text[2:] if text.startswith("ch") else text
    number = text.split("_")[0]
    ids = chapter_ids()
    if number.isdigit() and f"ch{int(number):02d}" in ids:
        return f"ch{int(number):02d}"
    raise ValueError(f"unknown chapter {chapter!r}; the graded chapters are {', '.join(ids)}")


def resolve_target(target=None) -> Path:
    """The folder to grade: a PATH as given, else ``exercises``/``solutions`` of this checkout.

    ``None`` means the environment variable FLASHCOURSE_TARGET, or else ``exercises``.
    """
    target = target or os.environ.get("FLASHCOURSE_TARGET") or "exercises"
    path = Path(target).expanduser()
    looked = [path.resolve()]
    if not path.is_dir() and str(target) in ("exercises", "solutions"):
        path = REPO_ROOT / str(target)
        looked.append(path)
    if not path.is_dir():
        places = " or ".join(dict.fromkeys(str(p) for p in looked))
        raise TargetError(
            f"target folder not found: {places}; give --target exercises, --target solutions or the path "
            f"of a folder holding the chapter files (e.g. ch01_naive.py)"
        )
    return path.resolve()


# --- the submission's text ------------------------------------------------------------------------

def read_source(path: Path) -> tuple:
    """(text, why not) of a submission file: (None, None) when it is missing, (None, reason) when it is no
    Python text. The grader reads it; the worker compiles exactly this text."""
    try:
        if not path.is_file():
            return None, None
        data = path.read_bytes()[: MAX_SOURCE + 1]
    except OSError as e:
        return None, f"it cannot be read ({e.strerror})"
    if len(data) > MAX_SOURCE:
        return None, f"it is larger than {MAX_SOURCE >> 20} MiB"
    try:
        return importlib.util.decode_source(data), None
    except (UnicodeDecodeError, SyntaxError) as e:
        return None, f"it is not UTF-8 text ({e})"


_GRADER_TEXT = re.compile(r"flashcourse\.grading\b(?!\.(?:%s)\b)" % "|".join(GRADER_NAMES))


def grader_use(source: str):
    """(line, what) of the first place where a submission's text uses the grader beyond GRADER_NAMES (its
    modules, checks, probes or worker), or None. Read here, in the grader: no code of the submission runs."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            used = [a.name for a in node.names if a.name.startswith("flashcourse.grading.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [a.name for a in node.names]
            used = ([module] if module.startswith("flashcourse.grading.") else
                    [f"{module}.{n}" for n in names if n not in GRADER_NAMES] if module == "flashcourse.grading" else
                    ["flashcourse.grading"] if module == "flashcourse" and "grading" in names else [])
        elif isinstance(node, ast.Attribute) and node.attr == "grading":
            above = parents.get(node)
            used = [] if isinstance(above, ast.Attribute) and above.attr in GRADER_NAMES else [f"….grading.{getattr(above, 'attr', '')}".rstrip(".")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _GRADER_TEXT.search(node.value):
            used = [_GRADER_TEXT.search(node.value).group()]
        else:
            used = []
        if used:
            return line, used[0]
    return None


# --- the parent's side of a call -----------------------------------------------------------------

class Session:
    """The worker of one chapter on one target, restarted after a crash or a time-out.

    isolate=False runs the worker's code in this process (no time limit, no guard pages): for the
    project's own tests of honest submissions only, since the learner's code then shares the oracle.
    """

    def __init__(self, target: Path, chapter: str, *, isolate: bool = True, user: Optional[str] = None):
        from .checks import chapter as chapter_checks

        self.target, self.chapter, self.isolate, self.user = target, chapter, isolate, user
        self.file = f"{chapter_checks(chapter).file}.py"
        self.source, self.unreadable = read_source(Path(target) / self.file)
        self.process = None
        self.local = None
        self.request_id, self.answered = None, False  # answered: the process has answered a call before
        self.cpu_spent = self.cpu_seen = 0.0
        self.cpu_start = 0.0  # CPU seconds the current worker spent starting (imports): not the learner's
        self.disqualified = {}  # exercise (or None: the whole file) -> CheckFailed to repeat
        used = grader_use(self.source) if self.source is not None else None
        if used:
            self.disqualified[None] = CheckFailed(
                f"{self.file} uses {used[1]} (line {used[0]}): a submission may use only "
                f"{' and '.join(GRADER_NAMES)} of the grader",
                "remove it: your functions run in a process of their own, and the grader checks what they return")

    def _start(self) -> None:
        try:
            self.process = WorkerProcess(REPO_ROOT, user=self.user)
        except OSError as e:
            who = f" as {self.user} (who must be able to run {sys.executable} and read the course)" if self.user else ""
            raise TargetError(f"the grading worker process did not start{who}: {e}") from None
        self.process.send({"target": str(self.target), "chapter": self.chapter, "source": self.source,
                           "unreadable": self.unreadable})
        self.answered = False
        try:
            header, blobs = self.process.receive(START_TIMEOUT)
        except (WorkerDied, WorkerTimeout, wire.ProtocolError):
            self.stop()
            raise TargetError("the grading worker process did not start: run `flashcourse doctor`") from None
        if not isinstance(wire.decode(header, blobs), dict):
            self.stop()
            raise TargetError("the grading worker process did not start: run `flashcourse doctor`")
        self.cpu_start, self.cpu_seen = self.process.cpu_seconds() or 0.0, 0.0

    def stop(self) -> None:
        if self.process is not None:
            self.cpu_spent, self.cpu_seen = self.cpu_used(), 0.0
            self.process.stop()
        self.process = None

    def cpu_used(self) -> float:
        """CPU seconds used by this session's workers so far (the last one as last seen, if it is gone)."""
        if self.process is not None:
            seen = self.process.cpu_seconds()
            self.cpu_seen = seen - self.cpu_start if seen is not None else self.cpu_seen
        return self.cpu_spent + self.cpu_seen

    def request(self, message: dict, budget: "Budget", device: str) -> tuple:
        """(reply dict, input names) of one call; WorkerTimeout / WorkerDied / ProtocolError otherwise."""
        self.request_id = secrets.token_hex(8)  # a reply cannot be forged by counting the calls
        message = {**message, "id": self.request_id}
        if not self.isolate:
            return self._local(message, device)
        if self.process is None:
            began = time.monotonic()
            self._start()
            budget.exclude(time.monotonic() - began)  # starting Python and torch is not the learner's time
        self.process.send(message)
        names, started = [], False
        while True:
            try:
                wait = budget.left()
                if wait <= 0:
                    raise WorkerTimeout
                try:
                    header, blobs = self.process.receive(wait)
                except WorkerTimeout:
                    continue  # look at the budget again
            except WorkerDied as e:
                e.inputs = names
                self.stop()
                raise
            except WorkerTimeout as e:
                e.importing = not started and not self.answered  # the learner's file never loaded
                self.stop()
                raise
            except wire.ProtocolError:
                self.stop()
                raise
            try:
                reply = wire.decode(header, blobs, _expect_device(device))
            except wire.ProtocolError:
                self.stop()
                raise
            if not isinstance(reply, dict) or reply.get("id") != self.request_id:
                self.stop()
                raise wire.ProtocolError("a reply to another request")
            if "inputs" in reply:  # the module is loaded, the call begins
                names = [str(n) for n in reply["inputs"]] if isinstance(reply["inputs"], list) else []
                started = True
                continue
            self.answered = True
            return reply, names

    def _local(self, message: dict, device: str) -> tuple:
        from .worker import Worker

        if self.local is None:
            self.local = Worker(self.target, self.chapter, self.source, unreadable=self.unreadable, isolate=False)
        message = {**message, "guard": {"only": []}}  # no guard pages in this process: slack after each tensor
        replies = []
        send = lambda reply: replies.append(wire.through(reply, place=_expect_device(device)))  # noqa: E731
        self.local.handle(wire.through(message, layout=True), send)
        names = next((r["inputs"] for r in replies if "inputs" in r), [])
        return replies[-1], names


def _expect_device(device: str):
    def place(entry, t):
        if entry.get("device") != device:
            return wire.Opaque("torch.Tensor", f"a tensor on {entry.get('device')}, expected on {device}")
        return t

    return place


class Budget:
    """The time limit of one check: ``seconds`` of the workers' CPU time (what the learner's code computes,
    the same on a busy machine as on an idle one) and WALL_FACTOR times as many seconds of wall time."""

    def __init__(self, session: Session, seconds: float):
        self.session, self.seconds = session, seconds
        self.cpu = session.cpu_used() if session.isolate else 0.0
        self.wall = time.monotonic() + WALL_FACTOR * seconds

    def exclude(self, seconds: float) -> None:
        """Do not count these seconds of wall time (a worker starting)."""
        self.wall += seconds

    def left(self) -> float:
        """Seconds to wait for a reply before looking again; 0 once the budget is spent."""
        now = time.monotonic()
        if now >= self.wall or self.session.cpu_used() - self.cpu >= self.seconds:
            return 0.0
        return min(POLL, self.wall - now)


class Submission:
    """The learner's module as a check sees it: ``m.name(*args)`` runs ``name`` in the worker.

    Tensor arguments travel as data (a transposed view keeps its strides); the result comes back as
    plain CPU tensors. ``m.name.watch(probe, **params)(*args)`` returns (result, what the probe saw);
    ``m.run(driver, *args)`` runs a driver of the chapter on the learner's module.
    """

    def __init__(self, session: Session, check, budget: Budget, output: list):
        self._session, self._check, self._budget, self._output = session, check, budget, output

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return _Remote(self, {"call": name})

    def run(self, driver: str, *args, **kwargs):
        return _Remote(self, {"driver": driver})(*args, **kwargs)


class _Remote:
    def __init__(self, submission: Submission, target: dict, probe: Optional[dict] = None):
        self._sub, self._target, self._probe = submission, target, probe

    def watch(self, probe: str, **params) -> "_Remote":
        return _Remote(self._sub, self._target, {"name": probe, "params": params})

    def __call__(self, *args, **kwargs):
        sub = self._sub
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        message = {**self._target, "exercise": sub._check.exercise, "args": list(args), "kwargs": kwargs,
                   "device": device, "probe": self._probe}
        reply = _ask(sub._session, message, sub._budget, device)
        sub._output.append(str(reply.get("output", "")))
        failure = reply.get("failure")
        if failure is not None:
            raise _failure(failure, sub._session, sub._check)
        modified = reply.get("modified") or []
        if modified:
            names = ", ".join(str(n) for n in modified)
            raise CheckFailed(f"{_what(self._target)} changed its input {names} in place",
                              f"leave the caller's tensors as they are: compute into new tensors "
                              f"({modified[0]} * scale, not {modified[0]} *= scale or {modified[0]}.mul_())")
        value = reply.get("value")
        return (value, reply.get("observed") or {}) if self._probe else value


def _what(target: dict) -> str:
    return target.get("call") or target.get("driver", "")


class WorkerCrash(Exception):
    """The worker died during a check; the message says how, in the learner's terms."""


def _ask(session: Session, message: dict, budget: Budget, device: str) -> dict:
    """The reply to one call; on a crash on the CPU, find the input read past its end."""
    try:
        reply, _ = session.request(message, budget, device)
        return reply
    except WorkerDied as e:
        raise WorkerCrash(_crash_message(session, message, budget, device, e)) from None
    except wire.ProtocolError as e:
        raise WorkerCrash(f"the worker sent something that is not a result ({e}): does your code write to "
                          f"file descriptors it did not open?") from None


def _crash_message(session, message, budget, device, died: WorkerDied) -> str:
    status = died.status
    if status is None:
        return "the worker stopped answering during this check (did your code close its pipes or file descriptors?)"
    if status == 70:  # procs: the worker itself failed, after the learner's code had run in it
        return ("the grading process broke down during this check (exit status 70): did your code change Python, "
                "torch or the grader?")
    if status >= 0:
        return (f"your code ended the grading process (exit status {status}, e.g. os._exit() or a "
                f"crashed thread) during this check")
    signame = signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else "a signal"
    native = f"the worker process was killed by {signame} during this check (a crash in native code?)"
    if device != "cpu" or status not in (-signal.SIGSEGV, -signal.SIGBUS) or not session.isolate:
        return native
    # the call again with room after every tensor instead of a guard page: if it still crashes, it is no
    # access past the end of a tensor; if not, guard one tensor of its kernels at a time, the guard page
    # unreadable, then only unwritable (a crash then is a store)
    try:
        reply = session.request({**message, "guard": {"only": []}}, budget, device)[0]
    except WorkerDied:
        return (f"the worker process was killed by {signame} during this check, also with room after every tensor "
                f"its kernels got (a crash in native code, or a recursion too deep?)")
    except (WorkerTimeout, wire.ProtocolError):
        return native
    names = reply.get("launch_args") if isinstance(reply.get("launch_args"), list) else []
    for index, name in enumerate(names[:MAX_GUARDED]):
        try:
            session.request({**message, "guard": {"only": [index]}}, budget, device)
            continue
        except WorkerDied:
            pass
        except (WorkerTimeout, wire.ProtocolError):
            break
        try:
            session.request({**message, "guard": {"only": [index], "write": True}}, budget, device)
            wrote = False
        except WorkerDied:
            wrote = True
        except (WorkerTimeout, wire.ProtocolError):
            wrote = False
        return (f"{'wrote' if wrote else 'read'} past the end of {name} (the process crashed with {signame}): "
                f"a {'store' if wrote else 'load'} without a mask, or a mask that lets offsets >= the length through")
    return native


def _failure(record: dict, session: Session, check) -> Exception:
    """The exception a worker's failure record becomes in the check (and is remembered for the next)."""
    from .checks import chapter

    chapter_checks = chapter(check.chapter) if check.chapter in chapter_ids() else None
    kind, file = str(record.get("kind")), str(record.get("file", ""))
    name = str(record.get("name", check.exercise))
    line = record.get("line")
    at = f" ({file} line {line})" if isinstance(line, int) else ""
    if kind == "not_implemented":
        return NotImplementedError(str(record.get("message") or f"{check.chapter}.{check.exercise}: {STUB_SUFFIX}"))
    if kind == "exception":
        return CheckFailed(f"raised {record.get('type')}: {record.get('message')}{at}")
    if kind == "exit":
        return CheckFailed(f"called exit({record.get('code')}){at}: return a result instead")
    if kind == "result":
        return CheckFailed(f"the result could not be sent back: {record.get('message')}")
    rule = "every graded function must be defined in the submission file"
    if kind == "missing_file":
        failure = CheckFailed(f"{file} is missing from {record.get('folder')}",
                              f"the grader looks for {file} in the target folder; keep the exercise file names")
    elif kind == "unreadable":
        failure = CheckFailed(f"{file} in {record.get('folder')} cannot be graded: {record.get('message')}",
                              f"save {file} as UTF-8 Python text, readable by the grader")
    elif kind == "syntax":
        failure = CheckFailed(f"could not import {file}: SyntaxError: {record.get('message')}{at}",
                              f"fix the syntax error at line {line} of {file} (python -m py_compile {file} shows it)")
    elif kind == "import":
        failure = CheckFailed(f"could not import {file}: {record.get('type')}: {record.get('message')}{at}",
                              f"importing {file} must work on its own: `python {file}` shows the error")
    elif kind == "missing":
        got = f" (it is a {record.get('got')})" if record.get("got") else ""
        failure = CheckFailed(f"{file} defines no function {name}{got}",
                              f"keep the names and signatures of the exercise file; "
                              f"`python -m flashcourse.grading.make_exercises --out DIR` writes a fresh copy")
    elif kind == "origin":
        failure = CheckFailed(f"{name} is not defined in {file}: it comes from {record.get('source')} ({rule})",
                              f"write {name} in {file} itself, not imported or loaded from another file")
    elif kind == "foreign":
        failure = CheckFailed(f"{name} ran {record.get('function')}() of {record.get('source')}: {rule}, "
                              f"and may run only code of {file}, flashcourse's helpers and installed libraries",
                              f"write {name} in {file} itself")
    elif kind == "forbidden":
        whose = "a library's" if record.get("library") else "the package's"
        instead = chapter_checks.spec(check.exercise).instead if chapter_checks else ""
        failure = CheckFailed(f"{name} calls {record.get('calls')}: "
                              f"{instead or f'this exercise is to write it yourself, without {whose} implementation'}",
                              "write it with torch's elementary operations (or tl. in a kernel) and the helpers the "
                              "exercise file imports")
    elif kind == "unused":
        failure = CheckFailed(f"the call never ran {name} of {file}",
                              f"the given code must call your {name}, as the exercise file does")
    elif kind == "not_launched":
        failure = CheckFailed(f"{record.get('call')} never launched {record.get('kernel')}: the launcher must run "
                              f"your kernel", "keep the given launcher as it is and write the kernel's body")
    elif kind == "not_written":
        failure = CheckFailed(f"{record.get('call')} returned a tensor that {record.get('kernel')} did not write, or that "
                              f"changed after it wrote it", "keep the given launcher: it returns the tensors your kernel "
                                                            "stores into, as the kernel left them")
    elif kind == "torch_work":
        failure = CheckFailed(f"{record.get('call')} computed with torch ({record.get('op')}) outside the kernel: "
                              f"in a kernel exercise the kernel computes", "keep the given launcher: it only allocates, "
                                                                            "reshapes and launches; compute in the kernel")
    elif kind == "overrun":
        failure = CheckFailed(f"wrote past the end of {record.get('arg')} (the bytes after it changed): a store without "
                              f"a mask, or a mask that lets offsets >= the length through")
    elif kind == "tampered":
        during = " while the file was imported" if record.get("importing") else ""
        failure = CheckFailed(f"your code changed {record.get('name')}{during}: the grader relies on it",
                              "leave Python's builtins, torch, numpy, Triton, flashcourse and the grader as they are")
    elif kind == "refused":
        during = "while the file was imported" if record.get("importing") else f"in {name}"
        failure = CheckFailed(f"your code {record.get('what')} ({record.get('event')}) {during}: the grader does not let "
                              f"exercises do that", "compute with torch (or tl. in a kernel) in the function itself: "
                                                    "no threads, processes, files, ctypes or frames")
    else:
        return CheckFailed(f"the worker sent an unknown failure {kind!r}")
    whole = kind in ("missing_file", "unreadable", "syntax", "import") or record.get("importing")
    session.disqualified[None if whole else check.exercise] = failure
    return failure


def not_implemented_message(chapter_checks, exercise: str, target: Path) -> str:
    """'not implemented yet: write it in exercises/ch02_softmax.py (notebooks/02_online_softmax.ipynb, …)'."""
    try:
        where = (target / f"{chapter_checks.file}.py").relative_to(Path.cwd())
    except ValueError:
        where = target / f"{chapter_checks.file}.py"
    return f"{STUB_SUFFIX}: write {exercise} in {where} (notebooks/{chapter_checks.notebook}.ipynb, section “Your turn”)"


def run_check(session: Session, check, timeout: float, chapter_checks) -> Result:
    """Run one check against the session's worker."""
    result = Result(check.chapter, check.exercise, check.name, check.points, 0, "passed", hint=check.hint)
    output = []
    start = time.monotonic()
    try:
        repeated = session.disqualified.get(None) or session.disqualified.get(check.exercise)
        if repeated is not None:
            raise repeated
        torch.manual_seed(0)
        with seeded(session.source):  # the inputs of this very file: the same every time, unknown before
            check.run(Submission(session, check, Budget(session, timeout), output))
        result.earned = check.points
    except CheckFailed as e:
        result.status, result.message = "failed", str(e)
        result.hint = e.hint if e.hint is not None else check.hint
    except NotImplementedError:
        result.status, result.hint = "not implemented", ""
        result.message = not_implemented_message(chapter_checks, check.exercise, session.target)
    except WorkerTimeout as e:
        result.status = "timed out"
        result.message = (f"no result within the time limit of {timeout:g} s of computing ({WALL_FACTOR * timeout:g} s "
                          f"in all): an endless loop, or a loop whose end is never reached?")
        if getattr(e, "importing", False):
            file = f"{chapter_checks.file}.py"
            result.message = f"importing {file} did not finish within the time limit of {timeout:g} s"
            result.hint = (f"code at the top level of {file} runs when the file is imported: keep it to "
                           f"definitions (put experiments under if __name__ == '__main__':)")
            session.disqualified[None] = CheckFailed(f"importing {file} timed out in an earlier check", result.hint)
    except WorkerCrash as e:
        result.status, result.message = "error", str(e)
    except StillRunning:
        raise
    except Exception as e:  # noqa: BLE001  (a result of a shape no check foresaw must not stop the grading)
        result.status = "failed"
        result.message = f"the result could not be checked ({type(e).__name__}: {str(e)[:200]})"
    result.seconds = time.monotonic() - start
    result.output = "".join(output)[-MAX_OUTPUT:]
    return result


def grade(chapters: Optional[Iterable] = None, target=None, *, isolate: bool = True,
          timeout: Optional[float] = None, exercises: Optional[Iterable[str]] = None,
          worker_user: Optional[str] = None, progress: Optional[Callable] = None) -> list:
    """Run the checks of ``chapters`` (default: all) against ``target``; return the Results in order.

    timeout: the time limit of each check in seconds (default DEFAULT_TIMEOUT); exercises: keep only
    the checks of these exercises; worker_user: run the learner's code as this user (the grader must
    be root); progress(results): called with the Results of each exercise as it finishes.
    isolate=False runs the learner's code in this process, for the project's own tests only.
    Ctrl-C raises GradingInterrupted with the Results that finished (the worker is gone by then).
    """
    folder = resolve_target(target)
    ids = [chapter_id(c) for c in chapters] if chapters else chapter_ids()
    limit = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not limit > 0:
        raise ValueError(f"the time limit must be a positive number of seconds, got {timeout!r}")
    keep = None if exercises is None else set(exercises)
    plan = all_chapters()  # every check module is imported before any learner code runs
    results = []
    try:
        with subreaper() if isolate else contextlib.nullcontext():
            for chapter in ids:
                session = Session(folder, chapter, isolate=isolate, user=worker_user)
                try:
                    checks = [c for c in plan[chapter] if keep is None or c.exercise in keep]
                    _grade_chapter(session, checks, plan[chapter], limit, progress, results)
                finally:
                    session.stop()  # the worker and everything it started are gone before the next chapter
    except KeyboardInterrupt:
        raise GradingInterrupted(results) from None
    return results


def _grade_chapter(session: Session, checks: list, chapter_checks, limit: float, progress, results: list) -> None:
    """Run ``checks`` (of one chapter) against the session's worker, appending their Results."""
    last = {c.exercise: i for i, c in enumerate(checks)}
    hung, done = {}, {}  # exercise -> why its other checks are not run; exercise -> its Results so far
    for i, check in enumerate(checks):
        if check.exercise in hung:
            result = Result(check.chapter, check.exercise, check.name, check.points, 0, "not run", hung[check.exercise])
        else:
            result = run_check(session, check, limit, chapter_checks)
            if result.status in ("timed out", "error"):
                what = "timed out" if result.status == "timed out" else "crashed the worker"
                whole_file = session.disqualified.get(None)
                hung[check.exercise] = str(whole_file) if whole_file else f"an earlier check of this exercise {what}"
        results.append(result)
        done.setdefault(check.exercise, []).append(result)
        if progress is not None and last[check.exercise] == i:
            progress(done[check.exercise])


def load_module(target: Path, chapter: str):
    """Import ``target/<chapter file>.py`` afresh in this process, under a name unique to the folder.

    For a notebook that calls the learner's own functions next to the package's; grading never does this.
    """
    import hashlib
    import importlib.util

    from .checks import chapter as chapter_checks

    path = Path(target) / f"{chapter_checks(chapter).file}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from {target}")
    name = f"_flashcourse_target_{hashlib.sha1(str(target).encode()).hexdigest()[:10]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
