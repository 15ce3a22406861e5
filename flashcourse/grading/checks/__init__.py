"""Grading checks, one module per chapter (``chNN.py``); each defines ``CHECKS``, a ``ChapterChecks``.

A new chapter is found by its file name alone: add ``checks/ch10.py`` and ``solutions/ch10_<name>.py``.
"""

import importlib
import pkgutil
import re


def chapter_ids() -> list:
    """The chapters that have grading checks, in course order ('ch01', 'ch02', ...)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if re.fullmatch(r"ch\d\d", m.name))


def chapter(chapter_id: str):
    """The ``ChapterChecks`` of one chapter."""
    return importlib.import_module(f"{__name__}.{chapter_id}").CHECKS


def all_chapters() -> dict:
    """{chapter id: ChapterChecks} of every chapter (importing them all)."""
    return {c: chapter(c) for c in chapter_ids()}
