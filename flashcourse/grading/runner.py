"""Run the grading checks of some chapters against a target folder, each check under a time limit.

The target folder (``exercises/``, ``solutions/`` or a student's copy) is loaded file by file through
importlib under a name of its own, so two targets never clash. By default every check runs in a
worker process: the parent waits at most the check's time limit for its result, and on a time-out
(an endless loop, a hanging kernel) or a crash it kills the worker and starts a fresh one for the
checks that remain. Whatever the learner's code prints is captured with the result, never shown
between the lines of the report.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .framework import CHAPTERS, STUB_SUFFIX, Check, CheckFailed, chapter_id

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 60.0  # seconds per check (the slowest takes a few on a 2-core CPU)
MAX_OUTPUT = 2000  # characters of captured learner output kept per check


class TargetError(Exception):
    """The target cannot be graded at all (e.g. the folder does not exist)."""


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


def resolve_target(target=None) -> Path:
    """The folder to grade: a PATH as given, else ``exercises``/``solutions`` of this checkout.

    ``None`` means the environment variable FLASHCOURSE_TARGET, or else ``exercises``.
    """
    target = target or os.environ.get("FLASHCOURSE_TARGET") or "exercises"
    path = Path(target).expanduser()
    if not path.is_dir() and str(target) in ("exercises", "solutions"):
        path = REPO_ROOT / str(target)
    if not path.is_dir():
        raise TargetError(
            f"target folder {str(target)!r} not found (looked in {Path.cwd()} and {REPO_ROOT}); give "
            f"--target exercises, --target solutions or the path of a folder holding the chapter files "
            f"({', '.join(f + '.py' for f in CHAPTERS.values())})"
        )
    return path.resolve()


def available_chapters() -> list:
    """The chapters that have grading checks, in course order."""
    return [c for c in CHAPTERS if importlib.util.find_spec(f"flashcourse.grading.checks.{c}") is not None]


def chapter_checks(chapter: str) -> list:
    if chapter not in available_chapters():
        raise ValueError(f"chapter {chapter} has no grading checks yet; graded: {', '.join(available_chapters())}")
    return importlib.import_module(f"flashcourse.grading.checks.{chapter}").CHECKS


_modules: dict = {}


def load_module(target: Path, chapter: str, fresh: bool = False):
    """Import ``target/<chapter file>.py`` under a name unique to the target folder (cached unless fresh)."""
    key = (str(target), chapter)
    if fresh or key not in _modules:
        path = target / f"{CHAPTERS[chapter]}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} is missing from {target}")
        tag = hashlib.sha1(str(target).encode()).hexdigest()[:10]
        name = f"_flashcourse_target_{tag}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        _modules[key] = module
    return _modules[key]


def _where(exc: BaseException, target: Path) -> str:
    """' (ch02_softmax.py line 42)': the last frame of the traceback inside the target folder."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).parent == target]
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).parent == target:
        return f" ({Path(exc.filename).name} line {exc.lineno})"
    return f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""


def run_check(target: Path, check: Check) -> Result:
    """Run one check in this process, capturing what the learner's code prints."""
    result = Result(check.chapter, check.exercise, check.name, check.points, 0, "passed", hint=check.hint)
    out = io.StringIO()
    start = time.perf_counter()
    try:
        import torch

        torch.manual_seed(0)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                module = load_module(target, check.chapter)
            except FileNotFoundError as e:
                raise CheckFailed(str(e)) from None
            except Exception as e:
                why = e.msg if isinstance(e, SyntaxError) else e
                raise CheckFailed(f"could not import {CHAPTERS[check.chapter]}.py: "
                                  f"{type(e).__name__}: {why}{_where(e, target)}") from None
            check.run(module)
        result.earned = check.points
    except CheckFailed as e:
        result.status, result.message = "failed", str(e)
    except NotImplementedError as e:
        message = str(e) if STUB_SUFFIX in str(e) else f"{check.chapter}.{check.exercise}: {STUB_SUFFIX}"
        result.status, result.message = "not implemented", message
    except SystemExit as e:
        result.status, result.message = "failed", f"called exit({e.code}) {_where(e, target).strip()}"
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        result.status, result.message = "failed", f"raised {type(e).__name__}: {first_line}{_where(e, target)}"
    result.seconds = time.perf_counter() - start
    result.output = out.getvalue()[-MAX_OUTPUT:]
    return result


def serve() -> None:
    """The worker (``python -m flashcourse.grading.runner``): answer pickled (target, chapter, index)
    on stdin with a pickled Result on stdout. Anything else written to the fds 1 and 2 (the learner's
    code, Triton, C++) goes to /dev/null, never into the protocol or the parent's terminal."""
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    tasks = sys.stdin.buffer
    sys.stdin = open(os.devnull)  # input() in learner code gets EOF instead of waiting forever
    import flashcourse  # noqa: F401  (switches Triton's interpreter on before anything imports triton)

    def send(message) -> None:
        pickle.dump(message, replies)
        replies.flush()

    send("ready")
    while True:
        try:
            target, chapter, index = pickle.load(tasks)
        except EOFError:
            return
        send(run_check(Path(target), chapter_checks(chapter)[index]))


class Worker:
    """A child Python process that runs checks; killed and replaced when a check overruns its time limit.

    A plain subprocess (not multiprocessing), so that grading from a learner's script never re-runs
    that script in the child.
    """

    START_TIMEOUT = 300.0

    def __init__(self):
        self.process = None
        self.replies = None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "flashcourse.grading.runner"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.replies = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.replies), daemon=True).start()
        if self._reply(self.START_TIMEOUT) != "ready":
            self.stop()
            raise TargetError("the grading worker process did not start: run `flashcourse doctor`")

    @staticmethod
    def _read(stream, replies) -> None:
        try:
            while True:
                replies.put(pickle.load(stream))
        except Exception:  # EOF: the worker died or was killed
            replies.put(None)

    def _reply(self, timeout: float):
        """The next message of the worker; TimeoutError after ``timeout`` s, None when it died."""
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdin.close()
            self.process.stdout.close()
        self.process = self.replies = None

    def run(self, target: Path, check: Check, index: int, timeout: float) -> Result:
        if self.process is None:
            self._start()
        start = time.perf_counter()
        try:
            pickle.dump((str(target), check.chapter, index), self.process.stdin)
            self.process.stdin.flush()
            reply = self._reply(timeout)
        except TimeoutError:
            reply = "timed out"
        except OSError:  # the pipe broke: the worker is gone
            reply = None
        if isinstance(reply, Result):
            return reply
        if reply == "timed out":
            status = "timed out"
            message = f"no result within the time limit of {timeout:g} s: an endless loop, or a loop whose end is never reached?"
        else:
            status = "error"
            message = f"the worker process died (exit code {self.process.wait()}) during this check: a crash in native code?"
        self.stop()
        return Result(check.chapter, check.exercise, check.name, check.points, 0, status, message, check.hint,
                      seconds=time.perf_counter() - start)


def grade(chapters: Optional[Iterable] = None, target=None, *, isolate: bool = True,
          timeout: Optional[float] = None, exercises: Optional[Iterable[str]] = None) -> list:
    """Run the checks of ``chapters`` (default: all) against ``target``; return the Results in order.

    isolate=False runs the checks in this process (faster, but no time limit). ``timeout``: the time
    limit of each check (default DEFAULT_TIMEOUT); ``exercises`` keeps only the checks of these names.
    """
    folder = resolve_target(target)
    ids = [chapter_id(c) for c in chapters] if chapters else available_chapters()
    keep = None if exercises is None else set(exercises)
    worker = Worker() if isolate else None
    plan = {chapter: chapter_checks(chapter) for chapter in ids}
    results = []
    try:
        for chapter, checks in plan.items():
            hung = {}  # exercise -> why: it overran a time limit or killed the worker; its other checks would too
            for index, check in enumerate(checks):
                if keep is not None and check.exercise not in keep:
                    continue
                if check.exercise in hung:
                    results.append(Result(check.chapter, check.exercise, check.name, check.points, 0, "not run",
                                          hung[check.exercise], check.hint))
                elif worker is None:
                    results.append(run_check(folder, check))
                else:
                    limit = timeout or DEFAULT_TIMEOUT
                    results.append(worker.run(folder, check, index, limit))
                    if results[-1].status in ("timed out", "error"):
                        what = "timed out" if results[-1].status == "timed out" else "crashed the worker"
                        hung[check.exercise] = f"not run: an earlier check of this exercise {what}"
    finally:
        if worker is not None:
            worker.stop()
    return results


if __name__ == "__main__":
    # serve through the imported module, so that the Results pickle as flashcourse.grading.runner.Result
    from flashcourse.grading.runner import serve as serve_imported

    serve_imported()
