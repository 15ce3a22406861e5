"""Generate exercises/ from solutions/: every ``### BEGIN SOLUTION`` … ``### END SOLUTION`` block
becomes a stub that raises ``NotImplementedError("chNN.<function>: not implemented yet")``.

    python -m flashcourse.grading.make_exercises           # rewrite exercises/
    python -m flashcourse.grading.make_exercises --check   # exit 1 if exercises/ is out of date
"""

import argparse
import re
import sys
from pathlib import Path

from .framework import CHAPTERS, stub_message

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HEADER = "# Your exercises: replace each stub, then run `flashcourse grade {chapter}`. Generated from solutions/.\n"
DEF = re.compile(r"^(\s*)(?:async\s+)?(def|class)\s+(\w+)")


def _enclosing(lines: list, index: int, indent: int) -> str:
    """The dotted name of the def (and class) that contain line ``index`` indented by ``indent``."""
    names = []
    for line in reversed(lines[:index]):
        m = DEF.match(line)
        if m and len(m.group(1)) < indent:
            names.append(m.group(3))
            indent = len(m.group(1))
    if not names:
        raise ValueError(f"line {index + 1}: a solution block must sit inside a function")
    return ".".join(reversed(names))


def make_exercise(source: str, chapter: str) -> str:
    """The exercise file of a solution file's text."""
    lines = source.splitlines(keepends=True)
    out, i = [HEADER.format(chapter=chapter)], 0
    while i < len(lines):
        if lines[i].strip() != BEGIN:
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise ValueError(f"line {i + 1}: {BEGIN} without {END}")
        name = _enclosing(lines, i, len(indent))
        out.append(f'{indent}raise NotImplementedError("{stub_message(name, chapter)}")\n')
        i = end + 1
    return "".join(out)


def generate(solutions: Path) -> dict:
    """{file name: exercise text} for every chapter file of ``solutions``."""
    files = {}
    for chapter, stem in CHAPTERS.items():
        path = solutions / f"{stem}.py"
        if path.is_file():
            files[path.name] = make_exercise(path.read_text(), chapter)
    return files


def main(argv=None) -> int:
    from .runner import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m flashcourse.grading.make_exercises", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether exercises/ is up to date")
    args = parser.parse_args(argv)
    solutions, exercises = REPO_ROOT / "solutions", REPO_ROOT / "exercises"
    stale = []
    for name, text in generate(solutions).items():
        path = exercises / name
        if not path.is_file() or path.read_text() != text:
            stale.append(name)
            if not args.check:
                exercises.mkdir(exist_ok=True)
                path.write_text(text)
    verb = "out of date" if args.check else "written"
    print(f"exercises/: {', '.join(stale) if stale else 'nothing'} {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
