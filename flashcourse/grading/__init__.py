"""The autograder: checks per chapter that compare a learner's exercises with the flashcourse package.

- ``flashcourse grade [CHAPTER ...] [--target exercises|solutions|PATH] [--json FILE]`` (``cli``);
- ``flashcourse.check("ch02")`` in a notebook;
- ``python -m flashcourse.grading.make_exercises`` regenerates exercises/ from solutions/.
"""

import time

from .framework import CHAPTERS, chapter_id, require_implemented
from .report import render_html, render_text, total
from .runner import grade, load_module, resolve_target

__all__ = ["CHAPTERS", "Report", "check", "grade", "load", "require_implemented"]


class Report(list):
    """The Results of a grading run; shows itself as a table (HTML in a notebook)."""

    def __init__(self, results, target, seconds: float):
        super().__init__(results)
        self.target, self.seconds = target, seconds

    @property
    def score(self) -> tuple:
        """(points earned, points possible)."""
        return total(self)

    def __str__(self) -> str:
        return render_text(self, self.target, compact=True)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return render_html(self, self.target)


def check(chapter, target=None, *, timeout=None) -> Report:
    """Grade one chapter ('ch02', 'ch02_softmax' or 2) and return a Report that shows as a compact table.

    target: a folder; default the environment variable FLASHCOURSE_TARGET, or else ``exercises``.
    The chapter's file is loaded fresh from disk, so edits are picked up without restarting.
    """
    folder = resolve_target(target)
    start = time.perf_counter()
    results = grade([chapter_id(chapter)], folder, timeout=timeout)
    return Report(results, folder, time.perf_counter() - start)


def load(chapter, target=None):
    """The target's module of one chapter (default: exercises/ch02_softmax.py for 'ch02'), imported afresh,
    so that a notebook can call the learner's own functions next to the package's."""
    return load_module(resolve_target(target), chapter_id(chapter), fresh=True)
