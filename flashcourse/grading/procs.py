"""The worker process that runs learner code, and the end of it and of everything it started.

On Linux the grading process becomes a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): a process
that the learner's code detaches (double fork, ``os.setsid``) is re-parented to the grader instead of
to init, so the grader can find it. ``WorkerProcess.stop`` freezes (SIGSTOP) and kills (SIGKILL) the
worker, every process below it, every orphan re-parented to the grader since the worker started, and
every process that carries the worker's token in its environment, until a scan of /proc finds none
alive; then it reaps them. Elsewhere (macOS) the worker leads its own session and the grader kills
that process group: a descendant that calls ``os.setsid`` there escapes (see exercises/README.md).
"""

import ctypes
import ctypes.util
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from . import wire

LINUX = sys.platform.startswith("linux")
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
TOKEN_VARIABLE = "FLASHCOURSE_GRADING_WORKER"


def _prctl(option: int, value: int) -> bool:
    if not LINUX:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); True when it is."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def make_undumpable() -> bool:
    """Forbid other processes of this user to read or trace this one's memory (Linux; the CLI only)."""
    return _prctl(PR_SET_DUMPABLE, 0)


def _process_table() -> dict:
    """{pid: (ppid, state)} of every process in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), fields[0].decode())
        except (OSError, IndexError, ValueError):
            continue
    return table


def _carries(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{TOKEN_VARIABLE}={token}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _children(pid: int) -> set:
    return {p for p, (ppid, _) in _process_table().items() if ppid == pid} if LINUX else set()


def kill_tree(root: int, token: str, spared: set) -> None:
    """Kill ``root``, its descendants, the grader's orphans not in ``spared`` and the carriers of
    ``token``; reap those that are the grader's children. Linux only (see the module docstring)."""
    me, seen = os.getpid(), set()
    for _ in range(100):
        table = _process_table()
        targets = {root} & set(table)
        targets |= {p for p, (ppid, _) in table.items() if ppid == me and p not in spared}
        targets |= {p for p in table if p not in spared and p != me and _carries(p, token)}
        grew = True
        while grew:  # everything below a target
            below = {p for p, (ppid, _) in table.items() if ppid in targets and p != me} - targets
            targets |= below
            grew = bool(below)
        alive = [p for p in targets if table[p][1] not in ("Z", "X")]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in alive:
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
        seen |= targets
        for p in targets:
            if table[p][0] == me:
                _reap(p)
        if not alive:
            return
    raise RuntimeError("could not stop the processes the learner's code started")


def _reap(pid: int, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.002)


class WorkerDied(Exception):
    """The worker ended during a request; ``status`` is its exit status (negative: killed by a signal)."""

    def __init__(self, status: Optional[int]):
        super().__init__(status)
        self.status = status


class WorkerTimeout(Exception):
    """No reply within the time limit."""


class WorkerProcess:
    """A Python process running ``flashcourse.grading.worker``; requests and replies are ``wire`` frames.

    user: run it as this user (the grader must be root). It starts in a fresh scratch folder, in a
    session of its own (Ctrl-C in the terminal reaches the grader, not the learner's code).
    """

    def __init__(self, repo_root: Path, *, user: Optional[str] = None, spared: frozenset = frozenset()):
        self.token = secrets.token_hex(8)
        self.scratch = Path(tempfile.mkdtemp(prefix="flashcourse-worker-"))
        env = {**os.environ, TOKEN_VARIABLE: self.token, "PYTHONDONTWRITEBYTECODE": "1",
               "TMPDIR": str(self.scratch)}
        env.pop("PYTHONSTARTUP", None)
        kwargs = {}
        if user is not None:
            import pwd

            record = pwd.getpwnam(user)
            os.chown(self.scratch, record.pw_uid, record.pw_gid)
            env.update(HOME=str(self.scratch), USER=user, LOGNAME=user, TRITON_CACHE_DIR=str(self.scratch / "triton"))
            kwargs = {"user": record.pw_uid, "group": record.pw_gid, "extra_groups": []}
        boot = (f"import sys; sys.path.insert(0, {str(repo_root)!r}); "
                "from flashcourse.grading.worker import main; main()")
        self.spared = set(spared) | _children(os.getpid())
        self.process = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, cwd=self.scratch, env=env, start_new_session=True,
                                        **kwargs)
        self.replies = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.replies), daemon=True).start()

    @staticmethod
    def _read(stream, replies) -> None:
        try:
            while True:
                replies.put(wire.read_frame(stream))
        except (EOFError, OSError, ValueError):
            replies.put(None)
        except wire.ProtocolError as e:
            replies.put(e)

    def send(self, message) -> None:
        try:
            wire.write_message(self.process.stdin, message, layout=True)
        except (OSError, ValueError):  # the pipe broke: the worker is gone
            pass

    def receive(self, timeout: float) -> tuple:
        """The next (header, blobs); WorkerTimeout, WorkerDied or wire.ProtocolError otherwise."""
        try:
            frame = self.replies.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise WorkerTimeout from None
        if isinstance(frame, wire.ProtocolError):
            raise frame
        if frame is None:
            try:
                status = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                status = None
            raise WorkerDied(status)
        return frame

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Kill the worker and everything it started, and wait until they are gone."""
        if self.process is None:
            return
        if LINUX:
            kill_tree(self.process.pid, self.token, self.spared)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                pass
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.process = None
        shutil.rmtree(self.scratch, ignore_errors=True)
