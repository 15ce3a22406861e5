"""The autograder itself: solutions score full points, stubs score 0, and bad code never breaks a run."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from flashcourse.grading import CHAPTERS, check, grade, load
from flashcourse.grading.cli import main as grade_cli
from flashcourse.grading.framework import CheckFailed, expect_close
from flashcourse.grading.make_exercises import generate, main as make_exercises_main
from flashcourse.grading.report import total
from flashcourse.grading.runner import REPO_ROOT, available_chapters

SOLUTIONS, EXERCISES = REPO_ROOT / "solutions", REPO_ROOT / "exercises"
FILES = sorted(p.name for p in SOLUTIONS.glob("ch*.py"))


def test_solutions_get_full_points_in_worker():
    results = grade(None, SOLUTIONS)
    failed = [f"{r.chapter} {r.exercise}: {r.name}: {r.status}: {r.message}" for r in results if r.status != "passed"]
    assert not failed, "\n".join(failed)
    assert {r.chapter for r in results} == {f[:4] for f in FILES}


def test_pristine_exercises_score_zero_and_say_not_implemented():
    results = grade(None, EXERCISES, isolate=False)
    assert results and total(results)[0] == 0
    implemented = [(r.name, r.message) for r in results if r.status != "not implemented"]
    assert not implemented, implemented
    assert all(r.message.endswith("not implemented yet") for r in results)


def test_exercises_are_what_the_generator_makes():
    assert sorted(p.name for p in EXERCISES.glob("*.py")) == FILES
    for name, text in generate(SOLUTIONS).items():
        stale = f"exercises/{name} is stale: run python -m flashcourse.grading.make_exercises"
        assert (EXERCISES / name).read_text() == text, stale


def test_make_exercises_check_mode_agrees(capsys):
    assert make_exercises_main(["--check"]) == 0
    assert "nothing out of date" in capsys.readouterr().out


def _signatures(path):
    """{qualified name: argument list} of the functions and classes of a file, and the names of its blocks."""
    tree = ast.parse(path.read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.unparse(node.args) if isinstance(node, ast.FunctionDef) else "class"
    return out


@pytest.mark.parametrize("name", FILES)
def test_exercises_and_solutions_agree_in_names_and_signatures(name):
    assert _signatures(EXERCISES / name) == _signatures(SOLUTIONS / name)
    assert "### BEGIN SOLUTION" in (SOLUTIONS / name).read_text()
    assert "SOLUTION" not in (EXERCISES / name).read_text()


def test_every_graded_chapter_has_its_solution_file():
    assert FILES == [f"{CHAPTERS[c]}.py" for c in available_chapters()]


@pytest.fixture
def student(tmp_path):
    """A copy of solutions/ch02_softmax.py whose safe_softmax loops forever, whose online_softmax kills its
    process and whose merge_states prints."""
    text = (SOLUTIONS / "ch02_softmax.py").read_text()
    text = text.replace("    # m = max_j x_j, 0 for an all −inf row\n", "    while True:\n        pass\n", 1)
    text = text.replace("        x_b = x[..., start : start + block]\n", "        __import__('os')._exit(3)\n", 1)
    text = text.replace("    # m = max(m_a, m_b)\n", "    print('debug print from the student')\n", 1)
    (tmp_path / "ch02_softmax.py").write_text(text)
    return tmp_path


def test_a_hang_or_a_crash_costs_only_its_exercise_and_prints_are_captured(student, capfd):
    results = grade(["ch02"], student, timeout=5)
    by_exercise = {}
    for r in results:
        by_exercise.setdefault(r.exercise, []).append(r.status)
    assert by_exercise["safe_softmax"][0] == "timed out" and by_exercise["online_softmax"][0] == "error"
    assert set(by_exercise["safe_softmax"][1:]) == set(by_exercise["online_softmax"][1:]) == {"not run"}
    assert set(by_exercise["merge_states"]) == {"passed"}
    assert all("debug print" in r.output for r in results if r.exercise == "merge_states")
    assert "debug print" not in capfd.readouterr().out


def test_cli_table_json_and_exit_status(tmp_path, capsys):
    shutil.copy(SOLUTIONS / "ch02_softmax.py", tmp_path)
    (tmp_path / "ch01_naive.py").write_text("def causal_mask(Nq, Nk):\n    return None +\n")  # a syntax error
    report = tmp_path / "results.json"
    assert grade_cli(["1", "ch02", "--target", str(tmp_path), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "could not import ch01_naive.py: SyntaxError" in out and "line 2" in out
    assert "hint:" in out and "total" in out
    data = json.loads(report.read_text())
    assert set(data) >= {"score", "tests"} and data["score"] == sum(t["score"] for t in data["tests"])
    assert all(set(t) >= {"name", "score", "max_score", "output"} for t in data["tests"])
    assert 0 < data["score"] < data["max_score"]
    # a file the target lacks costs its chapter's checks only
    assert grade_cli(["3", "--target", str(tmp_path)]) == 0
    assert "ch03_tiling.py is missing" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--target", "/no/such/folder"], "not found"), (["ch42"], "unknown chapter"),
                                           (["1", "--json", "/no/such/folder/r.json"], "could not write")])
def test_cli_exits_non_zero_only_when_it_cannot_run(argv, message, capsys):
    assert grade_cli(argv) == 2
    assert message in capsys.readouterr().err


def test_check_shows_a_table():
    report = check("ch01_naive", target=EXERCISES)
    assert report.score[0] == 0 and report.score[1] > 0
    assert "<table>" in report._repr_html_() and "not implemented yet" in str(report)


def test_load_gives_the_learners_module():
    mine = load(2, target=SOLUTIONS)
    x = torch.randn(3, 10)
    assert torch.allclose(mine.safe_softmax(x), torch.softmax(x, dim=-1))


def test_check_from_a_script_without_a_main_guard(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text("import flashcourse\nprint('score', flashcourse.check(2).score)\n")
    env = {**os.environ, "FLASHCOURSE_TARGET": str(SOLUTIONS), "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    points = total([r for r in grade(["ch02"], SOLUTIONS, isolate=False)])
    assert run.stdout.count("score") == 1 and f"score {points}" in run.stdout


@pytest.mark.parametrize("got, message", [
    (None, "expected a tensor of shape (2, 3), got NoneType"),
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
