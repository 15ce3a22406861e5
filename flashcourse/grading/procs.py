"""The worker process that runs learner code, and the end of it and of everything it started.

On Linux the grading process becomes a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): a process
that the learner's code detaches (double fork, ``os.setsid``) is re-parented to the grader instead of
to init, so the grader can find it. ``WorkerProcess.stop`` freezes (SIGSTOP) and kills (SIGKILL) the
worker, every process below it, every orphan re-parented to the grader since the worker started, and
every process that carries the worker's token in its environment, until a scan of /proc finds none
alive; then it reaps them. Elsewhere (macOS) the worker leads its own session and the grader kills
that process group: a descendant that calls ``os.setsid`` there escapes (see exercises/README.md).

A forked worker may allocate MEMORY_LIMIT bytes more than the zygote held (RLIMIT_DATA): a memory bomb
is a MemoryError in the learner's call, not the machine's OOM killer. Workers run with a fixed string
hash seed, and the grader reads their replies through a short queue (a worker that floods its pipe
waits). A zygote that stops answering (the learner's code, running as the grader's user, stopped it)
is replaced.

Starting Python and importing torch costs seconds, so on a machine without a GPU the workers are
forked from a ``Zygote``: a process that has imported torch, Triton and the grader but never runs
learner code, and that forks a fresh worker on request (setting its session, user and environment).
With a GPU each worker is a new Python process (CUDA does not survive a fork).
"""

import atexit
import contextlib
import ctypes
import ctypes.util
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from . import wire

LINUX = sys.platform.startswith("linux")
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 4, 36, 37
TOKEN_VARIABLE = "FLASHCOURSE_GRADING_WORKER"
ZYGOTE_TIMEOUT = 30.0  # seconds for the zygote to answer a request
MEMORY_LIMIT = 4 << 30  # bytes of memory a forked worker may allocate (then MemoryError, not the OOM killer)
# the same submission runs the same way every time: string hashing (set order), cuBLAS reductions
DETERMINISTIC_ENV = {"PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _prctl(option: int, value: int) -> bool:
    if not LINUX:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        zero = ctypes.c_ulong(0)
        return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero) == 0
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def subreaper():
    """While grading, this process reaps its orphaned descendants (Linux); afterwards it is as it was."""
    before = ctypes.c_int(0)
    if LINUX:
        _prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(before))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        if not before.value:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)


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


def kill_tree(root: int, token: str, spared: set, patience: float = 60.0) -> None:
    """Kill ``root``, its descendants, the grader's orphans not in ``spared`` and the carriers of
    ``token``; reap those that are the grader's children. Linux only (see the module docstring).

    A killed process may take a while to go (freeing gigabytes, dumping core): scan again, more and
    more slowly, for up to ``patience`` seconds."""
    me = os.getpid()
    deadline, pause = time.monotonic() + patience, 0.001
    while True:
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
        for p in targets:
            if table[p][0] == me:
                _reap(p)
        if not alive:
            return
        if time.monotonic() > deadline:
            raise StillRunning(f"could not stop the processes that the learner's code started ({sorted(alive)}) "
                               f"within {patience:g} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


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


class StillRunning(RuntimeError):
    """Processes started by the learner's code that would not die: no report may be written."""


class WorkerDied(Exception):
    """The worker ended during a request; ``status`` is its exit status (negative: killed by a signal)."""

    def __init__(self, status: Optional[int]):
        super().__init__(status)
        self.status = status


class WorkerTimeout(Exception):
    """No reply within the time limit."""


def _boot(repo_root: Path, main: str) -> list:
    """The command line of a Python process that runs ``main`` of the grader at ``repo_root``."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(repo_root)!r}); "
                                  f"from flashcourse.grading.{main} import main; main()"]


class Zygote:
    """A process that has imported torch and the grader, and forks workers (Linux and macOS, no GPU).

    Commands travel on a Unix socket as JSON lines; a fork request carries the worker's two pipe
    ends (SCM_RIGHTS). The zygote never runs learner code: its children do, after ``_child`` has
    given them their own session, folder, environment and user.
    """

    def __init__(self, repo_root: Path):
        ours, theirs = socket.socketpair()
        self.socket = ours
        self.process = subprocess.Popen(_boot(repo_root, "procs") + [str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, env={**os.environ, **DETERMINISTIC_ENV})
        theirs.close()
        self.lines = self.socket.makefile("r")
        self.broken = False

    def alive(self) -> bool:
        return not self.broken and self.process.poll() is None

    def _ask(self, message: dict, fds=(), timeout: float = ZYGOTE_TIMEOUT) -> dict:
        """The zygote's answer; OSError when it does not answer in time (e.g. the learner's code, running as
        the grader's user, stopped it), and the zygote is then replaced by a fresh one on next use."""
        try:
            self.socket.settimeout(timeout)
            socket.send_fds(self.socket, [json.dumps(message).encode() + b"\n"], list(fds))
            line = self.lines.readline()
            if not line:
                raise OSError("the zygote is gone")
            return json.loads(line)
        except (OSError, ValueError):
            self.broken = True
            self.process.kill()
            self.process.wait()
            raise OSError("the zygote did not answer") from None

    def close(self) -> None:
        """End the zygote (it exits when its socket closes) and wait for it: no grader process outlives
        the grading."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.lines.close()
        self.socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def fork(self, fds, **options) -> int:
        return int(self._ask({"op": "fork", **options}, fds)["pid"])

    def wait(self, pid: int, timeout: float = 5.0) -> Optional[int]:
        """The exit status of a worker (negative: the signal that killed it), reaped by the zygote."""
        try:
            return self._ask({"op": "wait", "pid": pid, "timeout": timeout}, timeout=timeout + ZYGOTE_TIMEOUT).get("status")
        except OSError:
            return None


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _limit_memory() -> None:
    """Let this process allocate at most MEMORY_LIMIT more bytes (Linux counts private mappings in RLIMIT_DATA)."""
    if not LINUX:
        return
    import resource

    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (used + MEMORY_LIMIT, used + MEMORY_LIMIT))


def _child(options: dict, request_fd: int, reply_fd: int, control: socket.socket) -> None:
    """In a freshly forked worker: its own session, folder, environment and user; then serve."""
    try:
        control.close()
        os.setsid()
        os.dup2(request_fd, 0)
        os.dup2(reply_fd, 1)
        os.closerange(3, 1 << 16)
        os.chdir(options["scratch"])
        os.environ.update(options["env"])
        _limit_memory()
        if options.get("user"):
            uid, gid = options["user"]
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
    except BaseException:  # noqa: BLE001  (the grader sees the worker end with status 70)
        os._exit(70)
    try:
        from .worker import main as serve

        serve()
    except BaseException:  # noqa: BLE001  (a broken protocol: status 70, not a learner's exit(0))
        os._exit(70)
    os._exit(0)


def main() -> None:
    """The zygote (``python -c ... procs main FD``): import everything a worker needs, then fork on request."""
    control = socket.socket(fileno=int(sys.argv[1]))
    from . import worker  # (torch, Triton's interpreter, flashcourse and the checks, once)
    from .checks import all_chapters

    all_chapters()
    worker.warm_up()  # once here, not in each forked worker
    statuses, buffer = {}, b""
    while True:
        data, fds, _, _ = socket.recv_fds(control, 1 << 16, 8)
        if not data:  # the grader is done: nothing to tear down
            os._exit(0)
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)
            while True:  # reap every finished child, keeping its status
                try:
                    pid, raw = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if not pid:
                    break
                statuses[pid] = _status(raw)
            if message["op"] == "fork":
                pid = os.fork()
                if pid == 0:
                    _child(message, fds[0], fds[1], control)
                for fd in fds:
                    os.close(fd)
                fds = []
                reply = {"pid": pid}
            else:
                pid, deadline = message["pid"], time.monotonic() + message["timeout"]
                while pid not in statuses and time.monotonic() < deadline:
                    try:
                        done, raw = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if done:
                        statuses[pid] = _status(raw)
                    else:
                        time.sleep(0.005)
                reply = {"status": statuses.pop(pid, None)}
            control.sendall(json.dumps(reply).encode() + b"\n")


_zygote = None


def zygote(repo_root: Path) -> Optional[Zygote]:
    """The zygote of this grading process (started on first use), or None where workers are spawned."""
    global _zygote
    from .._env import HAS_CUDA

    if HAS_CUDA or not hasattr(socket, "send_fds") or not hasattr(os, "fork"):
        return None
    if _zygote is None or not _zygote.alive():
        _zygote = Zygote(repo_root)
        atexit.register(_zygote.close)
    return _zygote


class WorkerProcess:
    """A Python process running ``flashcourse.grading.worker``; requests and replies are ``wire`` frames.

    user: run it as this user (the grader must be root). It starts in a fresh scratch folder, in a
    session of its own (Ctrl-C in the terminal reaches the grader, not the learner's code).
    """

    def __init__(self, repo_root: Path, *, user: Optional[str] = None, spared: frozenset = frozenset()):
        self.pid = None
        self.token = secrets.token_hex(8)
        self.scratch = Path(tempfile.mkdtemp(prefix="flashcourse-worker-"))
        env = {**os.environ, **DETERMINISTIC_ENV, TOKEN_VARIABLE: self.token, "PYTHONDONTWRITEBYTECODE": "1",
               "TMPDIR": str(self.scratch)}
        env.pop("PYTHONSTARTUP", None)
        kwargs = {}
        if user is not None:
            import pwd

            record = pwd.getpwnam(user)
            os.chown(self.scratch, record.pw_uid, record.pw_gid)
            env.update(HOME=str(self.scratch), USER=user, LOGNAME=user, TRITON_CACHE_DIR=str(self.scratch / "triton"))
            kwargs = {"user": record.pw_uid, "group": record.pw_gid, "extra_groups": []}
        self.zygote = zygote(repo_root)
        self.spared = set(spared) | _children(os.getpid())
        if self.zygote is not None:
            request_r, request_w = os.pipe()
            reply_r, reply_w = os.pipe()
            user_ids = [kwargs["user"], kwargs["group"]] if kwargs else None
            options = {"scratch": str(self.scratch), "user": user_ids,
                       "env": {k: env[k] for k in env if os.environ.get(k) != env[k]}}
            try:
                try:
                    self.pid = self.zygote.fork([request_r, reply_w], **options)
                except OSError:  # a zygote that the previous worker broke: once more with a fresh one
                    self.zygote = zygote(repo_root)
                    self.spared |= _children(os.getpid())
                    self.pid = self.zygote.fork([request_r, reply_w], **options)
            finally:
                os.close(request_r)
                os.close(reply_w)
            self.process, self.requests, replies = None, os.fdopen(request_w, "wb"), os.fdopen(reply_r, "rb")
        else:
            self.process = subprocess.Popen(_boot(repo_root, "worker"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, cwd=self.scratch, env=env,
                                            start_new_session=True, **kwargs)
            self.pid, self.requests, replies = self.process.pid, self.process.stdin, self.process.stdout
        # a short queue: a worker that floods its pipe waits for the grader instead of filling its memory
        self.replies, self.closed = queue.Queue(maxsize=2), threading.Event()
        threading.Thread(target=self._read, args=(replies, self.replies, self.closed), daemon=True).start()

    @staticmethod
    def _read(stream, replies, closed) -> None:
        """The reader thread: frames into ``replies`` until EOF or ``closed``; it alone closes the reply pipe
        (closing it from another thread would wait for this read, i.e. for whatever still holds the pipe)."""

        def put(item) -> None:
            while not closed.is_set():
                try:
                    return replies.put(item, timeout=0.1)
                except queue.Full:
                    pass

        try:
            while not closed.is_set():
                put(wire.read_frame(stream))
        except (EOFError, OSError, ValueError):
            put(None)
        except wire.ProtocolError as e:
            put(e)
        finally:
            stream.close()

    def send(self, message) -> None:
        try:
            wire.write_message(self.requests, message, layout=True)
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
            raise WorkerDied(self._exit_status())
        return frame

    def cpu_seconds(self) -> Optional[float]:
        """The CPU time (user and system, all threads) the worker has used so far; None where /proc is not."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, TypeError):
            return None

    def _exit_status(self):
        if self.zygote is not None:
            return self.zygote.wait(self.pid)
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Kill the worker and everything it started, and wait until they are gone."""
        if self.pid is None:
            return
        self.closed.set()
        if LINUX:
            kill_tree(self.pid, self.token, self.spared | {self.zygote.process.pid} if self.zygote else self.spared)
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.zygote is not None:
            self.zygote.wait(self.pid, timeout=1.0)
        else:
            self.process.kill()
            self.process.wait()
        try:
            self.requests.close()
        except OSError:
            pass
        self.pid = None
        shutil.rmtree(self.scratch, ignore_errors=True)
