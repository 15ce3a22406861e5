"""Submissions that try to fake a score, as a student might: each one runs in worker processes, as
grading does, and must lose its points without changing anything in the grader."""

import json
import os
import re
import secrets
import subprocess
import sys
import time

from flashcourse.grading import grade
from flashcourse.grading.report import total
from grading_helpers import SOLUTIONS, body, solution, submit

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
    cheat = f"source = {source!r}\nexec(source)\n"
    results = grade(["ch01"], submit(tmp_path, ch01_naive=cheat), exercises=["causal_mask"])
    assert _points(results)[0] == 0 and "exec()" in results[0].message


def _survivors(token: str) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
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
             "import sys\nsys._getframe(0)": "looked at the grader's frames"}
    folder = tmp_path
    for code, words in cases.items():
        submit(folder, ch01_naive=solution("ch01_naive") + "\n" + code + "\n")
        results = grade(["ch01"], folder, exercises=["causal_mask"])
        assert _points(results)[0] == 0 and words in results[0].message and "while the file was imported" in results[0].message, \
            (code, results[0].message)
    inside = body(solution("ch02_softmax"), "safe_softmax", "import threading\nthreading.Thread(target=print).start()\n"
                                                             "return torch.softmax(x, -1)")
    results = grade(["ch02"], submit(folder, ch02_softmax=inside), exercises=["safe_softmax"])
    assert _points(results)[0] == 0 and "started a thread (threading) in safe_softmax" in results[0].message
