"""The course notebooks: stored clean, and each runs top to bottom on the CPU with the solutions in place.

Every notebook is executed in a fresh ``python3`` kernel with ``FLASHCOURSE_TARGET=solutions`` (so the
"Your turn" checks grade the finished exercises) and ``FLASHCOURSE_STATIC_WIDGETS=1`` (sliders show their
static figure: with no front end a widget's messages are never answered), with ``notebooks/`` as its
working directory. A cell error fails the test; each chapter must draw at least one figure (an
``image/png`` output); the slowest cells are printed, and named when a notebook runs too long.
Run one chapter with ``pytest tests/test_notebooks.py -k 03``; they split across workers with ``-n 2``.
"""

import datetime
import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat and nbclient (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHAPTERS = [f"{n:02d}" for n in range(11)]  # 00–10 must be there
OPTIONAL_CHAPTERS = ["11"]  # ring attention, beyond one GPU
# each notebook must run well under this on a 2-core CPU (the budget is 90 s; this leaves room for load)
TIME_LIMIT_S = 240


def test_every_chapter_has_a_notebook():
    have = sorted(p.name[:2] for p in NOTEBOOKS)
    expected = f"one notebook per chapter {CHAPTERS} (and optionally {OPTIONAL_CHAPTERS})"
    assert len(have) == len(set(have)), f"expected {expected}, found {[p.name for p in NOTEBOOKS]}"
    assert set(CHAPTERS) <= set(have) <= set(CHAPTERS + OPTIONAL_CHAPTERS), \
        f"expected {expected}, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_has_the_parts_every_chapter_needs(path):
    """Goal first, a 'Your turn' that runs the grader, common bugs, and a closing summary."""
    nb = nbformat.read(path, as_version=4)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "At the end of this notebook you will be able to" in markdown[0], f"{path.name}: open with the goals"
    assert any("Your turn" in m for m in markdown) and "fc.check(" in code, f"{path.name}: no 'Your turn' check"
    if not path.name.startswith("00"):
        assert any("Common bugs" in m or "common benchmarking bugs" in m.lower() for m in markdown), path.name
    assert "## Summary" in markdown[-1] and ("Next" in markdown[-1] or "Where to go next" in markdown[-1]), path.name
    assert code.lstrip().startswith("import flashcourse"), f"{path.name}: import flashcourse first (Triton interpreter)"
    for name in re.findall(r"exercises/(ch\d\d_\w+\.py)", "\n".join(markdown)):
        assert (ROOT / "exercises" / name).exists(), f"{path.name} names exercises/{name}, which does not exist"


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def _slowest_cells(nb, n: int = 3) -> str:
    """'cell 11: 4.2 s, cell 5: 1.0 s, ...' from the timestamps nbclient records in each cell's metadata."""
    seconds = {}
    for i, cell in enumerate(nb.cells):
        stamps = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in stamps and "shell.execute_reply" in stamps:
            start, end = (datetime.datetime.fromisoformat(stamps[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            seconds[i] = (end - start).total_seconds()
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:n]
    return ", ".join(f"cell {i}: {s:.1f} s" for i, s in slowest)


@pytest.mark.timeout(TIME_LIMIT_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel inherits this environment: grade the solutions, draw with the inline backend,
    # and import this checkout's flashcourse even if it is not installed
    monkeypatch.setenv("FLASHCOURSE_TARGET", "solutions")
    monkeypatch.setenv("FLASHCOURSE_STATIC_WIDGETS", "1")
    # one CPU thread per kernel: with -n 2 on two cores, more threads only fight over them (a tiled loop
    # of chapter 03 ran 50× slower with two busy threads than with one)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIME_LIMIT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s (slowest: {_slowest_cells(nb)})")
    assert _images(nb) >= 1, f"{path.name} drew no figure (no image/png output)"
    assert seconds < TIME_LIMIT_S, f"{path.name} took {seconds:.0f} s; slowest: {_slowest_cells(nb)}"
