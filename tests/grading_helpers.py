"""Helpers of the grader's tests: submissions made from solutions/ by text edits, graded cheaply."""

import re
import textwrap
from pathlib import Path

from flashcourse.grading.checks import chapter
from flashcourse.grading.runner import REPO_ROOT, Session, run_check

SOLUTIONS = REPO_ROOT / "solutions"


def solution(stem: str) -> str:
    return (SOLUTIONS / f"{stem}.py").read_text()


def edit(text: str, old: str, new: str) -> str:
    """text with its one occurrence of ``old`` replaced (an error if there is not exactly one)."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times: the edit no longer fits solutions/"
    return text.replace(old, new)


def body(text: str, function: str, code: str) -> str:
    """text with the solution block of ``function`` replaced by ``code`` (dedented, re-indented)."""
    start = re.search(rf"^\s*def {function}\(", text, re.M)
    assert start, f"no function {function}"
    begin = text.index("### BEGIN SOLUTION", start.end())
    end = text.index("### END SOLUTION", begin)
    indent = text[text.rindex("\n", 0, begin) + 1: begin]
    lines = textwrap.indent(textwrap.dedent(code).strip("\n") + "\n", indent)
    return text[: text.rindex("\n", 0, begin) + 1] + lines + text[text.index("\n", end) + 1:]


def submit(folder: Path, **files: str) -> Path:
    """Write ``{stem: text}`` into folder; return it."""
    for stem, text in files.items():
        (folder / f"{stem}.py").write_text(text)
    return folder


def first_miss(folder: Path, stem: str, exercise: str, *, isolate: bool = False, timeout: float = 120.0):
    """The first Result of ``exercise`` that is not a pass, or None (cheaper than grading every check)."""
    chapter_id = stem[:4]
    checks = chapter(chapter_id)
    session = Session(folder, chapter_id, isolate=isolate)
    try:
        for check in checks:
            if check.exercise == exercise:
                result = run_check(session, check, timeout, checks)
                if result.status != "passed":
                    return result
    finally:
        session.stop()
    return None
