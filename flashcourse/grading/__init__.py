"""The autograder: checks per chapter that compare a learner's exercises with the flashcourse package.

- ``flashcourse grade [CHAPTER ...] [--target exercises|solutions|PATH] [--json FILE]`` (``cli``);
- ``flashcourse.check("ch02")`` in a notebook;
- ``python -m flashcourse.grading.make_exercises`` regenerates exercises/ from solutions/.

The learner's code runs in a worker process of its own; see ``runner`` and exercises/README.md.
"""

import time

from .framework import require_implemented, require_kernel_dtype
from .report import render_html, render_text, total
from .runner import GradingInterrupted, chapter_id, grade, load_module, resolve_target

__all__ = ["CHAPTERS", "Report", "check", "grade", "load", "require_implemented", "require_kernel_dtype"]


def __getattr__(name):
    if name == "CHAPTERS":  # {chapter id: exercise file stem}, from the check modules
        from .checks import all_chapters

        return {c: checks.file for c, checks in all_chapters().items()}
    raise AttributeError(name)


class Report(list):
    """The Results of a grading run; shows itself as a table (HTML in a notebook)."""

    def __init__(self, results, target, seconds: float, interrupted: bool = False):
        super().__init__(results)
        self.target, self.seconds, self.interrupted = target, seconds, interrupted

    @property
    def score(self) -> tuple:
        """(points earned, points possible)."""
        return total(self)

    def __str__(self) -> str:
        note = "\n(interrupted: the checks that finished)" if self.interrupted else ""
        return render_text(self, self.target, compact=True) + note

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return render_html(self, self.target)


def check(chapter, target=None, *, timeout=None) -> Report:
    """Grade one chapter ('ch02', 'ch02_softmax' or 2) and return a Report that shows as a compact table.

    target: a folder; default the environment variable FLASHCOURSE_TARGET, or else ``exercises``.
    The chapter's file is read afresh from disk by a new worker process, so edits are picked up.
    Interrupting (the notebook's stop button) returns the checks that finished.
    """
    folder = resolve_target(target)
    start = time.perf_counter()
    try:
        results, interrupted = grade([chapter_id(chapter)], folder, timeout=timeout), False
    except GradingInterrupted as e:
        results, interrupted = e.results, True
    return Report(results, folder, time.perf_counter() - start, interrupted)


def load(chapter, target=None):
    """The target's module of one chapter (default: exercises/ch02_softmax.py for 'ch02'), imported afresh
    in this process, so that a notebook can call the learner's own functions next to the package's."""
    return load_module(resolve_target(target), chapter_id(chapter))
