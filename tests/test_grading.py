"""The autograder itself: solutions score full points, fresh stubs score 0, bad code never breaks a run,
and the learner sees what to do. None of these tests reads the learner's exercises/: stubs are
generated afresh into a temporary folder, so the suite passes however far the exercises are solved."""

import ast
import io
import json
import os
import re
import shutil
import sys

import pytest
import torch

from flashcourse.grading import CHAPTERS, check, grade, load
from flashcourse.grading import cli as grading_cli
from flashcourse.grading import procs, wire
from flashcourse.grading.framework import CheckFailed, expect_close
from flashcourse.grading.make_exercises import digest, generate, main as make_exercises_main, read_manifest, write
from flashcourse.grading.report import render_text, total
from flashcourse.grading.runner import REPO_ROOT, Result, TargetError, resolve_target
from grading_helpers import SOLUTIONS, edit, solution, submit

FILES = sorted(p.name for p in SOLUTIONS.glob("ch*.py"))


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """Pristine exercise files, generated from solutions/ into a temporary folder."""
    folder = tmp_path_factory.mktemp("stubs")
    for name, text in generate(SOLUTIONS).items():
        (folder / name).write_text(text)
    return folder


def test_solutions_get_full_points_in_worker_processes():
    results = grade(None, SOLUTIONS)
    failed = [f"{r.chapter} {r.exercise}: {r.name}: {r.status}: {r.message}" for r in results if r.status != "passed"]
    assert not failed, "\n".join(failed)
    assert {f"{r.chapter}" for r in results} == {f[:4] for f in FILES}


def test_fresh_stubs_score_zero_and_say_where_to_write(stubs):
    results = grade(None, stubs, isolate=False)
    assert results and total(results)[0] == 0
    assert {r.status for r in results} == {"not implemented"}
    first = results[0].message
    assert "not implemented yet" in first and "ch01_naive.py" in first and "notebooks/01_naive_attention.ipynb" in first
    assert "Your turn" in first


def test_the_manifest_records_the_stubs_that_solutions_give(capsys):
    manifest = read_manifest(REPO_ROOT / "exercises")
    fresh = {name: digest(text) for name, text in generate(SOLUTIONS).items()}
    stale = [name for name in fresh if manifest.get(name) != fresh[name]]
    assert not stale, f"exercises/.manifest.json is stale for {stale}: run python -m flashcourse.grading.make_exercises"
    assert make_exercises_main(["--check"]) == 0
    assert "nothing out of date" in capsys.readouterr().out


def test_make_exercises_never_overwrites_the_learners_work(tmp_path, capsys):
    files = generate(SOLUTIONS)
    written, kept, moved, _ = write(tmp_path, files)
    assert sorted(written) == sorted(files) and not kept and not moved
    mine = (tmp_path / "ch01_naive.py").read_text().replace('raise NotImplementedError("ch01.causal_mask', "return 42  # (")
    (tmp_path / "ch01_naive.py").write_text(mine)
    changed = {**files, "ch01_naive.py": files["ch01_naive.py"] + "# a newer stub\n",
               "ch02_softmax.py": files["ch02_softmax.py"] + "# a newer stub\n"}
    written, kept, moved, _ = write(tmp_path, changed)
    assert kept == ["ch01_naive.py"] and written == ["ch02_softmax.py"]  # an untouched stub is updated
    assert (tmp_path / "ch01_naive.py").read_text() == mine
    written, kept, moved, backup = write(tmp_path, changed, force=True)
    assert moved == ["ch01_naive.py"] and (backup / "ch01_naive.py").read_text() == mine
    assert backup.parent.name == ".backup" and (tmp_path / "ch01_naive.py").read_text() == changed["ch01_naive.py"]
    # a backup is never graded: the grader reads exactly <target>/<chapter file>.py
    assert "/exercises/.backup/" in (REPO_ROOT / ".gitignore").read_text()
    assert make_exercises_main(["--out", str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "ch01_naive.py").read_text() == files["ch01_naive.py"]


@pytest.mark.parametrize("name", FILES)
def test_stubs_and_solutions_agree_in_names_and_signatures(stubs, name):
    def signatures(path):
        tree = ast.parse(path.read_text())
        return {node.name: ast.unparse(node.args) if isinstance(node, ast.FunctionDef) else "class"
                for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}

    assert signatures(stubs / name) == signatures(SOLUTIONS / name)
    assert "### BEGIN SOLUTION" in (SOLUTIONS / name).read_text()
    assert "SOLUTION" not in (stubs / name).read_text()


def test_every_graded_chapter_has_its_solution_file():
    assert FILES == [f"{stem}.py" for stem in CHAPTERS.values()]


@pytest.mark.parametrize("workers", ["forked", "spawned"])
def test_a_hang_an_exit_or_a_print_costs_only_its_exercise(tmp_path, capfd, monkeypatch, workers):
    """Forked from the zygote (CPU) or new processes (as with a GPU, where starting Python and torch takes
    seconds that are not the learner's: a 1.5 s limit still leaves the exit its own check)."""
    if workers == "spawned":
        monkeypatch.setattr(procs, "zygote", lambda root: None)
    text = edit(solution("ch02_softmax"), "    # m = max_j x_j, 0 for an all −inf row\n", "    while True:\n        pass\n")
    text = edit(text, "        x_b = x[..., start : start + block]\n", "        __import__('os')._exit(0)\n")
    text = edit(text, "    # m = max(m_a, m_b)\n", "    print('debug print from the student')\n")
    results = grade(["ch02"], submit(tmp_path, ch02_softmax=text), timeout=1.5)
    by = {}
    for r in results:
        by.setdefault(r.exercise, []).append(r)
    hang, exit_, merge = by["safe_softmax"], by["online_softmax"], by["merge_states"]
    assert hang[0].status == "timed out" and exit_[0].status == "error"
    assert "exit status 0" in exit_[0].message and "native code" not in exit_[0].message
    assert {r.status for r in hang[1:] + exit_[1:]} == {"not run"}
    assert {r.status for r in merge} == {"passed"} and all("debug print" in r.output for r in merge)
    table = render_text(results, tmp_path)
    assert "not run: an earlier check" in table and "not run: not run" not in table
    assert "debug print" not in capfd.readouterr().out


def test_cli_prints_progress_then_the_table_and_writes_json(tmp_path, capsys):
    shutil.copy(SOLUTIONS / "ch02_softmax.py", tmp_path)
    (tmp_path / "ch01_naive.py").write_text("def causal_mask(Nq, Nk):\n    return None +\n")  # a syntax error
    report = tmp_path / "results.json"
    assert grading_cli.main(["1", "ch02", "--target", str(tmp_path), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    progress, table = out.split("flashcourse grade · target")
    assert re.search(r"ch02 +merge_states +4/4 +ok", progress)
    assert "could not import ch01_naive.py: SyntaxError" in table and "line 2" in table
    assert "hint: fix the syntax error at line 2 of ch01_naive.py" in table
    assert "bottom-right" not in table  # no formula hint for a file that does not import
    data = json.loads(report.read_text())
    assert data["score"] == sum(t["score"] for t in data["tests"]) and 0 < data["score"] < data["max_score"]
    assert all(set(t) >= {"name", "score", "max_score", "output"} for t in data["tests"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".results.json")] == []  # no temp file left
    assert grading_cli.main(["3", "--target", str(tmp_path)]) == 0
    assert "ch03_tiling.py is missing" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--target", "/no/such/folder"], "not found"), (["ch42"], "unknown chapter"),
    (["1", "--json", "/no/such/folder/r.json"], "could not write"),
    (["1", "--worker-user", "no-such-user-here"], "no user named 'no-such-user-here'")])
def test_cli_exits_non_zero_only_when_it_cannot_run(argv, message, capsys):
    assert grading_cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "soon"])
def test_cli_refuses_a_time_limit_that_is_not_positive(seconds, capsys):
    with pytest.raises(SystemExit) as e:
        grading_cli.main(["1", "--timeout", seconds])
    assert e.value.code == 2 and "must be a positive number of seconds" in capsys.readouterr().err


def test_a_missing_target_names_each_folder_once(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(TargetError) as e:
        resolve_target("nonexist")
    assert str(e.value).count(str(REPO_ROOT / "nonexist")) == 1
    with pytest.raises(TargetError) as e:
        resolve_target("/no/such/exercises")
    assert str(e.value).count("/no/such/exercises") == 1


def test_worker_user_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert grading_cli.main(["1", "--worker-user", "root"]) == 2
    assert "needs the grader to run as root" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root, to run code as another user")
def test_worker_user_runs_the_learners_code_as_that_user():
    import pwd
    import tempfile
    from pathlib import Path

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    import sysconfig

    from flashcourse import HAS_CUDA

    # another user must reach the grader and, where workers are new processes (GPU), Python itself
    python = [Path(sys.executable).resolve().parent, Path(sysconfig.get_paths()["stdlib"])] if HAS_CUDA else []
    for needed in [REPO_ROOT, *python]:
        if any(p.stat().st_mode & 0o005 != 0o005 for p in [needed, *needed.parents]):
            pytest.skip(f"{needed} is not readable by other users")
    folder = Path(tempfile.mkdtemp(prefix="flashcourse-shared-"))  # pytest's own folders are private to root
    try:
        text = edit(solution("ch01_naive"), "    i = torch.arange(Nq)[:, None]\n",
                    "    import os\n    print('uid', os.getuid())\n    i = torch.arange(Nq)[:, None]\n")
        submit(folder, ch01_naive=text)
        # the grader reads the submission and sends its text: the worker's user need not be able to read it
        folder.chmod(0o700)
        (folder / "ch01_naive.py").chmod(0o600)
        results = grade(["ch01"], folder, worker_user="nobody", exercises=["causal_mask"])
        assert [r.status for r in results] == ["passed", "passed"], results
        assert f"uid {nobody.pw_uid}" in results[0].output
    finally:
        shutil.rmtree(folder)


def test_ctrl_c_prints_the_table_of_what_finished(tmp_path, monkeypatch, capsys):
    shutil.copy(SOLUTIONS / "ch02_softmax.py", tmp_path)
    seen = []

    def line(checks):
        seen.append(checks)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return "a progress line"

    monkeypatch.setattr(grading_cli, "progress_line", line)
    assert grading_cli.main(["2", "--target", str(tmp_path)]) == 130
    out = capsys.readouterr().out
    assert "safe_softmax" in out and "online_softmax" in out and "merge_states" not in out
    assert "interrupted" in out and "Traceback" not in out


def test_check_shows_every_failing_line_up_to_a_limit(stubs):
    report = check("ch01_naive", target=stubs)
    assert report.score[0] == 0 and report.score[1] > 0
    assert "<table>" in report._repr_html_() and "not implemented yet" in str(report)
    failed = [Result("ch03", "tiled", f"check {i}", 1, 0, "failed", f"wrong {i}", "a hint") for i in range(8)]
    compact = render_text(failed, stubs, compact=True)
    assert "wrong 3" in compact and "wrong 4" not in compact and "+4 more" in compact
    assert all(f"wrong {i}" in render_text(failed, stubs) for i in range(8))


def test_hints_belong_to_the_check_that_failed(tmp_path):
    text = edit(solution("ch02_softmax"), "l = l * torch.exp(m - m_safe) + ", "l = l + ")
    results = grade(["ch02"], submit(tmp_path, ch02_softmax=text), isolate=False, exercises=["online_softmax"])
    table = render_text(results, tmp_path)
    assert "hint: when the max grows from m to m_new, the old sum must be multiplied by exp(m − m_new)" in table
    text = edit(solution("ch01_naive"), "def naive_attention(", "def naive_attention_renamed(")
    text = edit(text, "return j <= i + (Nk - Nq)", "return (j <= i + (Nk - Nq)).int()")
    results = grade(["ch01"], submit(tmp_path, ch01_naive=text), isolate=False)
    table = render_text(results, tmp_path)
    assert "ch01_naive.py defines no function naive_attention" in table
    assert "hint: return a boolean tensor" in table and "_flashcourse" not in table


def test_load_gives_the_learners_module():
    mine = load(2, target=SOLUTIONS)
    x = torch.randn(3, 10)
    assert torch.allclose(mine.safe_softmax(x), torch.softmax(x, dim=-1))


@pytest.mark.parametrize("got, message", [
    (None, "expected a tensor of shape (2, 3), got NoneType"),
    (wire.Opaque("Sneaky", "a subclass Sneaky of torch.Tensor"), "got a subclass Sneaky of torch.Tensor"),
    (torch.zeros(3, 2), "shape (3, 2), expected (2, 3)"),
    (torch.zeros(2, 3, dtype=torch.float64), "dtype torch.float64, expected torch.float32"),
    (torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), "got nan at [0, 1]"),
    (torch.zeros(2, 3), "got 0.0 at [1, 2], want -inf"),
    (torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, float("-inf")]]), "max abs error 0.5 at [1, 0]"),
])
def test_expect_close_names_what_is_wrong(got, message):
    want = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("-inf")]])
    with pytest.raises(CheckFailed, match=re.escape(message)):
        expect_close("O vs oracle", got, want, atol=1e-3, dtype=torch.float32)
    expect_close("O vs oracle", want.clone(), want, atol=0, dtype=torch.float32)


def test_the_wire_carries_plain_data_only():
    x = torch.randn(3, 5)
    sent = {"t": x.t(), "b": x.bfloat16(), "s": (torch.zeros(0), None, 1.5, "a"), "n": [True, 3]}
    got = wire.through(sent, layout=True)
    assert got["t"].stride() == x.t().stride() and torch.equal(got["t"], x.t())
    assert got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], x.bfloat16())
    assert got["s"][0].shape == (0,) and got["s"][1:] == (None, 1.5, "a") and got["n"] == [True, 3]

    class Sneaky(torch.Tensor):
        pass

    odd = wire.through([torch.zeros(2).as_subclass(Sneaky), object()])
    assert all(isinstance(o, wire.Opaque) for o in odd) and "subclass Sneaky" in odd[0].reason
    import pickle

    for bad in (pickle.dumps({"x": 1}), wire.MAGIC + b"\xff" * 8, wire.MAGIC + (5).to_bytes(8, "little") + b"{oops"):
        with pytest.raises(wire.ProtocolError):
            wire.read_frame(io.BytesIO(bad))
    header = {"body": {"$tensor": 0, "dtype": "float32", "shape": [4]}, "$blobs": [3]}
    text = json.dumps(header).encode()
    with pytest.raises(wire.ProtocolError):
        wire.decode(*wire.read_frame(io.BytesIO(wire.MAGIC + len(text).to_bytes(8, "little") + text + b"abc")))


def _frame(body, blobs=(), sizes=None) -> bytes:
    text = json.dumps({"body": body, "$blobs": list(sizes if sizes is not None else map(len, blobs))}).encode()
    return wire.MAGIC + len(text).to_bytes(8, "little") + text + b"".join(blobs)


@pytest.mark.parametrize("frame", [
    wire.MAGIC + (wire.MAX_HEADER + 1).to_bytes(8, "little"),  # a huge header
    _frame({"x": 1}, sizes=[-4]),  # a negative size
    _frame({"x": 1}, sizes=[wire.MAX_BLOBS + 1]),  # too much tensor data
    wire.MAGIC + (40_000).to_bytes(8, "little") + b"[" * 20_000 + b"]" * 20_000,  # JSON nested past the recursion limit
    _frame({"$tensor": 0, "dtype": "float32", "shape": [float("nan")], "device": "cpu"}, [b"\0" * 4]),  # a NaN shape
    _frame({"$tensor": 0, "dtype": "float32", "shape": [1 << 40, 0], "device": "cpu"}, [b""]),  # a dim too large
    _frame({"$tensor": 0, "dtype": "complex64", "shape": [1], "device": "cpu"}, [b"\0" * 8]),  # a dtype not allowed
    _frame({"$tensor": 0, "dtype": "float32", "shape": [2, 2], "order": [0, 0], "device": "cpu"}, [b"\0" * 16]),
    _frame({"$tensor": 3, "dtype": "float32", "shape": [1], "device": "cpu"}, [b"\0" * 4]),  # no such blob
])
def test_a_forged_reply_is_refused_whole(frame):
    with pytest.raises(wire.ProtocolError):
        wire.decode(*wire.read_frame(io.BytesIO(frame)))


def test_the_strings_of_a_worker_cannot_steer_the_terminal():
    """A message, an exception's type or printed output that moves the cursor or erases a line could draw a
    forged row into the table: every unprintable character arrives escaped."""
    got = wire.through({"message": "ok\x1b[1A\x1b[2K\rch01 causal_mask 2/2 ok\u202e", "output": "a\tb\nc"})
    assert got["message"] == "ok\\x1b[1A\\x1b[2K\\x0dch01 causal_mask 2/2 ok\\u202e" and got["output"] == "a\tb\nc"
    bf16 = torch.tensor([1.5, -0.0, float("inf")], dtype=torch.bfloat16)  # travels as its bits
    assert torch.equal(wire.through(bf16).view(torch.int16), bf16.view(torch.int16))
    odd = wire.through([torch.zeros(3).expand(2, 3), torch.zeros(4, 6)[:, ::2]], layout=True)
    assert [t.shape for t in odd] == [(2, 3), (4, 3)] and all(type(t) is torch.Tensor for t in odd)


@pytest.mark.gpu
def test_on_a_gpu_kernels_are_graded_there_and_stubs_score_zero_in_workers(stubs):
    """With test_solutions_get_full_points_in_worker_processes (which grades the kernels on the GPU here,
    bfloat16 included), the GPU variant of 'solutions score full, stubs score 0'."""
    from flashcourse.grading.checks._common import device, kernel_dtypes

    assert device() == "cuda" and torch.bfloat16 in kernel_dtypes()
    results = grade(None, stubs)
    assert total(results)[0] == 0 and {r.status for r in results} == {"not implemented"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_the_grader_reaps_orphans_only_while_it_grades():
    import ctypes


    def reaper() -> int:
        flag = ctypes.c_int(-1)
        assert procs._prctl(procs.PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag))
        return flag.value

    assert reaper() == 0
    with procs.subreaper():
        assert reaper() == 1
    assert reaper() == 0


def test_a_file_that_never_finishes_importing_costs_one_time_limit(tmp_path):
    text = "while True:\n    pass\n" + solution("ch01_naive")  # the time limit counts the worker's CPU time
    results = grade(["ch01"], submit(tmp_path, ch01_naive=text), timeout=1.5)
    assert results[0].status == "timed out" and "importing ch01_naive.py did not finish" in results[0].message
    assert all("timed out in an earlier check" in r.message for r in results[1:])
    assert sum(r.seconds for r in results) < 10


def test_an_exception_names_its_line_of_the_submission(tmp_path):
    text = edit(solution("ch01_naive"), "    i = torch.arange(Nq)[:, None]\n", "    raise ValueError('my bug')\n")
    results = grade(["ch01"], submit(tmp_path, ch01_naive=text), isolate=False, exercises=["causal_mask"])
    line = text[: text.index("my bug")].count("\n") + 1
    assert results[0].message == f"raised ValueError: my bug (ch01_naive.py line {line})"


def test_make_exercises_refuses_then_forces_in_a_checkout(tmp_path, monkeypatch, capsys):
    from flashcourse.grading import runner

    shutil.copytree(SOLUTIONS, tmp_path / "solutions")
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    assert make_exercises_main([]) == 0
    mine = tmp_path / "exercises" / "ch02_softmax.py"
    mine.write_text(mine.read_text() + "# my work\n")
    (tmp_path / "solutions" / "ch02_softmax.py").write_text(solution("ch02_softmax") + "# newer\n")
    capsys.readouterr()
    assert make_exercises_main([]) == 1
    assert "not overwritten, because you changed them: ch02_softmax.py" in capsys.readouterr().err and "# my work" in mine.read_text()
    assert make_exercises_main(["--force"]) == 0
    assert "# my work" not in mine.read_text()
    assert [p.read_text().endswith("# my work\n") for p in (tmp_path / "exercises" / ".backup").glob("*/ch02_softmax.py")] == [True]


def test_a_result_no_check_foresaw_fails_its_check_only():
    from flashcourse.grading.checks import chapter
    from flashcourse.grading.framework import Check
    from flashcourse.grading.runner import Session, run_check

    def run(m):
        return m.safe_softmax(torch.zeros(2, 3)) / "a string"  # a check that did not foresee what came back

    check = Check("ch02", "safe_softmax", "unforeseen", 1, "a hint", run)
    result = run_check(Session(SOLUTIONS, "ch02", isolate=False), check, 60, chapter("ch02"))
    assert result.status == "failed" and result.message.startswith("the result could not be checked (TypeError")
