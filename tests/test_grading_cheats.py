"""Submissions that try to fake a score, as a student might: each one runs in worker processes, as
grading does, and must lose its points without changing anything in the grader."""

import json
import os
import re
import secrets
import subprocess
import sys
import time

from flashcourse import HAS_CUDA
from flashcourse.grading import grade
from flashcourse.grading.report import render_text, total
from flashcourse.grading.runner import grader_use
from grading_helpers import SOLUTIONS, body, edit, solution, submit

WRONG_NAIVE = '''
def naive_attention(q, k, v, causal=False, scale=None):
    return torch.zeros_like(q)
'''


def _points(results):
    earned, possible = total(results)
    return earned, possible


def test_replacing_the_oracle_at_import_changes_nothing(tmp_path):
    cheat = solution("ch01_naive").split("def naive_attention")[0] + WRONG_NAIVE + '''
import flashcourse, flashcourse.reference
fake = lambda q, k, v, **kw: (torch.zeros_like(q), torch.zeros(q.shape[:-1])) if kw.get("return_lse") else torch.zeros_like(q)
flashcourse.naive_attention = flashcourse.reference.naive_attention = fake
'''
    results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat), exercises=["naive_attention"])
    assert _points(results)[0] == 0, results


def test_silencing_the_check_helpers_changes_nothing_here_or_in_later_chapters(tmp_path):
    cheat = '''
import flashcourse.grading.framework as f, flashcourse.grading.checks._common as c
f.expect_close = f.expect = f.expect_tensor = c.expect_output = c.expect_close = lambda *a, **k: None
def causal_mask(Nq, Nk):
    return None
''' + "import torch\n" + WRONG_NAIVE
    folder = submit(tmp_path, ch01_naive=cheat, ch02_softmax=solution("ch02_softmax"))
    results = grade(["ch01", "ch02"], folder)
    assert _points([r for r in results if r.chapter == "ch01"])[0] == 0
    ch02 = [r for r in results if r.chapter == "ch02"]
    assert _points(ch02)[0] == _points(ch02)[1]


def test_a_tensor_subclass_that_agrees_with_everything_is_refused(tmp_path):
    cheat = '''
import torch

class Agreeable(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return True

def causal_mask(Nq, Nk):
    return torch.zeros(Nq, Nk, dtype=torch.bool).as_subclass(Agreeable)
'''
    results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat), exercises=["causal_mask"])
    assert _points(results)[0] == 0
    assert "subclass Agreeable of torch.Tensor" in results[0].message


def test_a_pickle_sent_down_the_workers_pipes_is_never_unpickled(tmp_path):
    marker = tmp_path / "the grader ran my code"
    cheat = solution("ch01_naive") + f'''
import os, pickle

class Payload:
    def __reduce__(self):
        return (open, ({str(marker)!r}, "w"))

import stat
pipes = []
for fd in range(3, 256):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            pipes.append(fd)
    except OSError:
        pass
for fd in pipes:
    try:
        os.write(fd, pickle.dumps(Payload()) * 8)
    except OSError:
        pass
'''
    results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat), exercises=["causal_mask"])
    assert not marker.exists()
    # it did find the pipe of the replies: what it wrote is what the grader refused
    assert _points(results)[0] == 0 and "not a result (a message without the protocol's marker)" in results[0].message


def test_a_submission_that_loads_solutions_from_disk_loses(tmp_path):
    cheat = f'''
import importlib.util
spec = importlib.util.spec_from_file_location("theirs", {str(SOLUTIONS / "ch01_naive.py")!r})
theirs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(theirs)
causal_mask = theirs.causal_mask

def naive_attention(q, k, v, causal=False, scale=None):
    return theirs.naive_attention(q, k, v, causal, scale)
'''
    results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat))
    assert _points(results)[0] == 0
    messages = {r.exercise: r.message for r in results}
    assert "causal_mask is not defined in ch01_naive.py: it comes from" in messages["causal_mask"]
    assert "solutions/ch01_naive.py" in messages["naive_attention"]
    source = solution("ch01_naive").replace("def causal_mask", "exec_me = None\ndef causal_mask")
    for cheat in (f"source = {source!r}\nexec(source)\n",
                  # compiled under the file's own name: still not the file's text
                  f"source = {source!r}\nexec(compile(source, __file__, 'exec'))\n"):
        results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat), exercises=["causal_mask"])
        assert _points(results)[0] == 0 and "exec() or compile() of text that is not in the file" in results[0].message
    # reading another file: solutions/ (runpy, open) or the package's source (to exec it inside a function)
    cheats = [f"import runpy\nglobals().update(runpy.run_path({str(SOLUTIONS / 'ch01_naive.py')!r}))\n",
              f"exec(compile(open({str(SOLUTIONS / 'ch01_naive.py')!r}).read(), __file__, 'exec'))\n",
              solution("ch01_naive").split("def naive_attention")[0] + WRONG_NAIVE.replace(
                  "    return torch.zeros_like(q)",
                  "    import inspect, flashcourse.reference as r\n    ns = dict(vars(r))\n"
                  "    exec(inspect.getsource(r.naive_attention), ns)\n"
                  "    return ns['naive_attention'](q, k, v, causal=causal, scale=scale)")]
    for cheat in cheats:
        results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat), exercises=["naive_attention"])
        assert _points(results)[0] == 0 and "your code opened a file (open " in results[0].message, results[0].message


def _survivors(token: str) -> list:
    """(pid, state) of the live processes whose environment holds ``token`` (a zombie is dead: not listed)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state not in "ZX":
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found.append((int(pid), state, f.read()[:120]))
        except (OSError, IndexError):
            pass
    return found


WRITER = """
import json, os, time
open(os.environ["CHEAT_REPORT"] + ".proof", "w").close()
end = time.time() + 30
while time.time() < end:
    try:
        with open(os.environ["CHEAT_REPORT"], "w") as f:
            json.dump({"score": 999, "max_score": 999, "tests": []}, f)
    except OSError:
        pass
    time.sleep(0.02)
"""
DAEMON = f"""
import os, sys

def _daemon():
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    os.execv(sys.executable, [sys.executable, "-c", {WRITER!r}])
"""


def test_a_detached_process_cannot_rewrite_the_report(tmp_path):
    """The learner's code starts a daemon (double fork, setsid) that keeps writing a perfect score into
    results.json: the report must be written after it is dead, and stay as written. (A plain os.fork is
    refused; this one hides its code under the name of a library file, so it runs: the grader kills it.)"""
    report, token = tmp_path / "results.json", secrets.token_hex(8)
    cheat = solution("ch01_naive").split("def naive_attention")[0] + WRONG_NAIVE + f"""
import torch as _t
_ns = {{}}
exec(compile({DAEMON!r}, _t.__file__, "exec"), _ns)
_ns["_daemon"]()
"""
    folder = submit(tmp_path, ch01_naive=cheat)
    env = {**os.environ, "CHEAT_REPORT": str(report), "CHEAT_TOKEN": token,
           "PYTHONPATH": os.pathsep.join([str(SOLUTIONS.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "flashcourse.grading.cli", "1", "--target", str(folder), "--json", str(report)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    printed = re.search(r"total\s+(\d+)/(\d+)", run.stdout).groups()
    written = json.loads(report.read_text())
    assert [str(written["score"]), str(written["max_score"])] == list(printed) and written["score"] < written["max_score"]
    time.sleep(0.5)
    assert json.loads(report.read_text()) == written
    assert _survivors(token) == [] and (tmp_path / "results.json.proof").exists()


def test_a_process_a_thread_a_file_or_ctypes_is_refused_to_the_submission(tmp_path):
    """The plain ways out of the worker's sight fail the whole file when the file does them on import,
    and the exercise when a call does them."""
    cases = {"import os\nos.fork()": "started a process (os.fork)",
             "import threading\nthreading.Thread(target=print).start()": "started a thread",
             "open('/etc/hostname').read()": "opened a file (open /etc/hostname)",
             "import ctypes\nctypes.CDLL(None)": "used ctypes",
             "import sys\nsys.setprofile(None)": "switched the profiler off",
             "import sys\nsys._getframe(0)": "looked at the grader's frames",
             "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)": "sent a signal (os.kill)",
             "import torch\ntorch.load('/tmp/answers.pt')": "opened a file (open /tmp/answers.pt)"}
    if sys.version_info >= (3, 12):  # cProfile is a sys.monitoring tool there
        cases["import sys\nsys.monitoring.set_events(sys.monitoring.PROFILER_ID, 0)"] = \
            "switched the profiler off (sys.monitoring.set_events)"
    folder = tmp_path
    for code, words in cases.items():
        submit(folder, ch01_naive=solution("ch01_naive") + "\n" + code + "\n")
        results = grade(["ch01"], folder, exercises=["causal_mask"])
        assert _points(results)[0] == 0 and words in results[0].message and "while the file was imported" in results[0].message, \
            (code, results[0].message)
    inside = body(solution("ch02_softmax"), "safe_softmax", "import threading\nthreading.Thread(target=print).start()\n"
                                                             "return torch.softmax(x, -1)")
    results = grade(["ch02"], submit(folder, ch02_softmax=inside), exercises=["safe_softmax"])
    assert _points(results)[0] == 0 and "started a thread (threading." in results[0].message
    assert "in safe_softmax" in results[0].message
    if sys.version_info >= (3, 12):  # the profiler switched off (and on again) inside a call
        toggled = body(solution("ch02_softmax"), "safe_softmax", "import sys\nm = sys.monitoring\nm.set_events(m.PROFILER_ID, 0)\n"
                                                                 "return torch.softmax(x, -1)")
        results = grade(["ch02"], submit(folder, ch02_softmax=toggled), exercises=["safe_softmax"])
        assert _points(results)[0] == 0 and "switched the profiler off" in results[0].message, results[0].message


def test_the_grader_itself_is_off_limits(tmp_path):
    """Using the grader's modules (to switch the profiler's verdict off, to fake a probe, to read a check's
    secrets) is refused from the submission's text, before any of it runs; replacing what the grader relies on
    (torch.equal, a builtin) in any other way is seen after the import, or after the call."""
    ch02 = solution("ch02_softmax")
    for code in ["import flashcourse.grading.worker as w\nw.Worker._judge = lambda *a: None",
                 "from flashcourse.grading import probes", "from flashcourse.grading.checks.ch08 import routed_scale",
                 "import flashcourse\nflashcourse.grading.probes.PROBES.clear()",
                 "import sys\nsys.modules['flashcourse.grading.probes'].PROBES.clear()"]:
        assert grader_use(ch02 + "\n" + code + "\n") is not None, code
    assert grader_use(solution("ch05_triton_forward")) is None  # what the stubs import
    cheat = body(ch02, "online_softmax", "from flashcourse.softmax import online_softmax as theirs\nreturn theirs(x, block=block)")
    results = grade(["ch02"], submit(tmp_path, ch02_softmax=cheat + "\nimport flashcourse.grading.worker as w\n"
                                                                    "w.Worker._judge = lambda *a, **k: None\n"))
    assert _points(results)[0] == 0 and "ch02_softmax.py uses flashcourse.grading.worker (line" in results[0].message
    in_place = edit(solution("ch01_naive"), "S = scale * (Q @ K.transpose(-2, -1))", "S = Q.mul_(scale) @ K.transpose(-2, -1)")
    results = grade(["ch01"], submit(tmp_path, ch01_naive=in_place + "\ntorch.equal = lambda a, b: True\n"),
                    exercises=["naive_attention"])
    assert _points(results)[0] == 0 and "changed torch.equal while the file was imported" in results[0].message
    in_call = body(ch02, "safe_softmax", "import builtins\nbuiltins.sorted = list\nreturn x")
    results = grade(["ch02"], submit(tmp_path, ch02_softmax=in_call), exercises=["safe_softmax"])
    assert _points(results)[0] == 0 and "changed builtins.sorted" in results[0].message


def test_a_reply_cannot_be_forged(tmp_path):
    """A call that writes a well-formed reply (a wrong mask) into the grader's pipe for each id it might
    have (requests are numbered by random tokens, not counted): refused as a reply to another request."""
    forge = body(solution("ch01_naive"), "causal_mask", '''
import json, os, stat, struct
j, i = torch.arange(Nk)[None, :], torch.arange(Nq)[:, None]
blob = (j <= i).numpy().tobytes()
for fd in range(3, 64):
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            continue
    except OSError:
        continue
    for rid in [*range(8), *map(str, range(8))]:
        value = {"$tensor": 0, "dtype": "bool", "shape": [Nq, Nk], "device": "cpu"}
        head = json.dumps({"body": {"id": rid, "value": value, "modified": []}, "$blobs": [len(blob)]}).encode()
        try:
            os.write(fd, b"FCW1" + struct.pack("<Q", len(head)) + head + blob)
        except OSError:
            pass
return j <= i + (Nk - Nq)''')
    results = grade(["ch01"], submit(tmp_path, ch01_naive=forge), exercises=["causal_mask"])
    assert _points(results)[0] == 0 and "a reply to another request" in results[0].message


def test_a_message_cannot_draw_over_the_table_and_memory_is_bounded(tmp_path):
    """An exception whose message moves the cursor and erases lines (to print a forged row of the table)
    arrives escaped; a call that asks for more memory than a worker may have fails as a call, without
    waking the machine's OOM killer."""
    text = body(solution("ch01_naive"), "causal_mask", 'raise ValueError("\\x1b[1A\\x1b[2K\\rch01 causal_mask 2/2 ok")')
    text = body(text, "naive_attention", "return torch.empty(5 << 30, dtype=torch.uint8)")
    results = grade(["ch01"], submit(tmp_path, ch01_naive=text))
    table = render_text(results, tmp_path)
    assert _points(results)[0] == 0 and "\x1b" not in table and "\r" not in table and "\\x1b[1A" in table
    bomb = next(r for r in results if r.exercise == "naive_attention")
    if not HAS_CUDA:  # workers forked from the zygote have a memory limit (RLIMIT_DATA)
        assert "can't allocate memory" in bomb.message
    else:  # with a GPU each worker is a new process, without one: the 5 GiB come back too large to send
        assert bomb.status == "error" and "too large" in bomb.message
