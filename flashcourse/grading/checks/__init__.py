"""Grading checks, one module per chapter; each defines ``CHECKS``, a ``ChapterChecks`` list."""
